//! The sockets under both HTTP/2 connections, wrapped so that a message's
//! frames leave in one write.
//!
//! h2 writes its frame buffer out whenever a DATA frame is big enough to be
//! sent from the caller's buffer instead of copied (256 bytes with vectored
//! writes, 1 KiB without): the frames after it (the trailers of a gRPC
//! answer, the next DATA frame) go in a second write. Each write wakes the
//! peer (kubelet, containerd), which reads a half message and sleeps again.
//! Here every write is copied into one buffer, and a flush first yields
//! once to the scheduler while new bytes keep coming, so h2 can append the
//! rest of what it has queued; the buffer goes out when a flush finds
//! nothing new (or when it is large). Under it, [`Socket`] keeps the
//! reactor from waking the shim when a peer merely read.

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Past this many buffered bytes a write goes out at once (memory bound;
/// far above one CRI message's frames of 16 KiB each).
const HIGH_WATER: usize = 256 << 10;

/// Longest a write holding only PING acknowledgements waits for company.
///
/// containerd (grpc-go) sends a PING with almost every answer to estimate
/// the link's bandwidth-delay product. Acknowledged at once, the ACK is a
/// write of its own, made before the answer is relayed to the kubelet
/// and waking containerd once more per call. Held, it leaves with the next
/// call's request (or after this long): one write, one wake-up, and off
/// the call's path. grpc-go only reads a round-trip time from it.
const PING_ACK_HOLD: std::time::Duration = std::time::Duration::from_millis(1);

#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// `buf.len()` when a flush last yielded: a flush that finds more has
    /// yielded for something and yields again; one that finds no more
    /// writes.
    seen: usize,
    /// Runs while the buffer holds only PING ACKs (see [`PING_ACK_HOLD`]).
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Coalesced {
            inner,
            buf: Vec::with_capacity(16 << 10),
            sent: 0,
            seen: 0,
            hold: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out the whole buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.seen = 0;
        self.hold = None;
        Poll::Ready(Ok(()))
    }

    fn make_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= HIGH_WATER {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.make_room(cx))?;
        me.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.make_room(cx))?;
        let mut n = 0;
        for b in bufs {
            me.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    /// Vectored, so h2 hands large DATA payloads over without copying them
    /// into its own buffer first (they are copied once, here).
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.buf.len() > me.seen && me.buf.len() < HIGH_WATER {
            // Let h2 (and the task that feeds it) add what follows.
            me.seen = me.buf.len();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if only_ping_acks(&me.buf[me.sent..]) {
            let hold = me
                .hold
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(PING_ACK_HOLD)));
            if hold.as_mut().poll(cx).is_pending() {
                // Reported flushed; the timer wakes the connection, whose
                // next flush sends the ACK if nothing took it along first.
                return Poll::Ready(Ok(()));
            }
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

/// Whether `b` is one or more whole HTTP/2 PING frames with the ACK flag
/// (9-byte header: 24-bit length, type 6, flags bit 0; 8-byte payload).
fn only_ping_acks(mut b: &[u8]) -> bool {
    if b.is_empty() {
        return false;
    }
    while !b.is_empty() {
        match b {
            [0, 0, 8, 6, flags, _, _, _, _, rest @ ..] if flags & 1 == 1 && rest.len() >= 8 => {
                b = &rest[8..]
            }
            _ => return false,
        }
    }
    true
}

/// A unix stream socket registered with the reactor for reading only.
///
/// tokio's `UnixStream` registers for both directions, edge-triggered, so
/// each time the peer reads what the shim wrote the shim is woken for an
/// EPOLLOUT nobody waits for: about one needless wake-up per call and
/// hop. Here writes go straight to the socket; only a write that finds the
/// socket full registers a duplicate descriptor for writability, until the
/// write succeeds.
#[derive(Debug)]
pub struct Socket {
    read: AsyncFd<UnixStream>,
    /// Present only while a write waits for room.
    write_wait: Option<AsyncFd<UnixStream>>,
}

impl Socket {
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        let std = stream.into_std()?;
        std.set_nonblocking(true)?;
        Ok(Socket {
            read: register(std, Interest::READABLE)?,
            write_wait: None,
        })
    }

    fn poll_io<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(&UnixStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        if self.write_wait.is_none() {
            match op(self.read.get_ref()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let dup = self.read.get_ref().try_clone()?;
                    self.write_wait = Some(register(dup, Interest::WRITABLE)?);
                }
                r => return Poll::Ready(r),
            }
        }
        let Some(wait) = &self.write_wait else {
            unreachable!("set above")
        };
        loop {
            let mut guard = ready!(wait.poll_write_ready(cx))?;
            if let Ok(r) = guard.try_io(|fd| op(fd.get_ref())) {
                // Deregistered on drop: no more EPOLLOUT wake-ups.
                self.write_wait = None;
                return Poll::Ready(r);
            }
        }
    }
}

fn register(s: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the UnixStream owns its descriptor and closes it only when
    // dropped, which the AsyncFd that owns it does after deregistering; its
    // `as_raw_fd` always returns that descriptor.
    Ok(unsafe { AsyncFd::register_with_interest(s, interest) }?)
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            let mut guard = ready!(me.read.poll_read_ready(cx))?;
            // SAFETY: read(2) only stores into the buffer and never reads
            // it, so uninitialised bytes are fine (tokio's own streams read
            // the same way); `assume_init` covers exactly the `n` bytes the
            // kernel wrote. Not zeroing first saves a memset of the whole
            // spare read buffer on every read.
            let unfilled = unsafe {
                &mut *(buf.unfilled_mut() as *mut [std::mem::MaybeUninit<u8>] as *mut [u8])
            };
            let want = unfilled.len();
            match guard.try_io(|fd| (&mut fd.get_ref()).read(unfilled)) {
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    // A short read drained the socket (as tokio's own
                    // streams assume): wait for the next edge instead of
                    // paying a read that returns EAGAIN.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |mut s| s.write(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |mut s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.read.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_ping_acks_are_held() {
        let ack = [0, 0, 8, 6, 1, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(only_ping_acks(&ack));
        assert!(only_ping_acks(&[ack, ack].concat()));
        assert!(!only_ping_acks(&ping));
        assert!(!only_ping_acks(&ack[..16]));
        assert!(!only_ping_acks(
            &[&ack[..], &[0, 0, 0, 1, 0, 0, 0, 0, 1]].concat()
        ));
        assert!(!only_ping_acks(&[]));
        assert!(!only_ping_acks(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }
}
