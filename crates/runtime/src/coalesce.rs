//! Server connections that gather a burst of responses into one write.
//!
//! A router relays a round's token chunks, one small message per client
//! stream, all at once. Each chunk wakes its stream's task, which wakes the
//! HTTP/2 connection task, and tokio runs a task just woken by the running
//! task next on the same thread (its LIFO slot). So the connection task ran
//! after every single chunk, and every chunk cost one `writev` on the socket:
//! a profile of the router under load put about 37% of its CPU in those
//! system calls.
//!
//! [`Coalesce`] holds what the connection writes and, on the first flush,
//! asks to be polled again instead of writing: a task that wakes itself is
//! queued behind every task already waiting, so by the time the flush runs,
//! the other streams' chunks of the burst have joined the buffer and leave in
//! one write. When nothing else is waiting the flush runs at once on the next
//! poll, so an idle connection adds one trip through the scheduler, not a
//! timer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Above this many buffered bytes a write goes out without waiting for the flush.
const MAX_BUFFERED: usize = 256 * 1024;

/// A connection whose writes are held until a deferred flush (module docs).
pub struct Coalesce<IO> {
    io: IO,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// The flush has yielded once since the buffer filled.
    deferred: bool,
}

impl<IO> Coalesce<IO> {
    pub fn new(io: IO) -> Self {
        Self { io, buf: Vec::new(), sent: 0, deferred: false }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Write out the buffer (Pending while the socket is full).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = data.iter().map(|s| s.len()).sum();
        if self.buf.len() + len > MAX_BUFFERED {
            ready!(self.poll_drain(cx))?;
        }
        for s in data {
            self.buf.extend_from_slice(s);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() > self.sent && !self.deferred {
            // Let the tasks already queued add their writes first.
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Coalesce<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes reach the peer in order, across the deferred flush, a write past
    /// the buffer limit and shutdown.
    #[tokio::test]
    async fn writes_arrive_whole_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(a);
        c.write_all(b"hello ").await.unwrap();
        c.write_all(b"world").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        let big: Vec<u8> = (0..MAX_BUFFERED + 1000).map(|i| (i % 251) as u8).collect();
        c.write_all(&big[..1000]).await.unwrap();
        c.write_all(&big[1000..]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = vec![];
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, big);
    }
}
