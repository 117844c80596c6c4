//! The frame relay's sockets on io_uring (`--relay uring`, the default):
//! one thread owns one ring and every relayed connection pair, and one
//! `io_uring_enter` submits the sends and receives of every connection that
//! has something to do and collects what finished. Driven by epoll, each
//! relayed message costs a read, a write and usually an epoll_wait per hop;
//! on a machine whose CPUs the kubelet's calls and containerd already keep
//! busy, those syscalls are most of what the shim costs (README, "CRI
//! shim", performance).
//!
//! This module knows sockets and buffers, not HTTP/2: a connection is a
//! [`Relayed`] (frames.rs) whose two [`RingIo`]s it fills and drains. The
//! relay's hook work (agent deliveries, RunPodSandbox's wait) stays on
//! tokio; what it finishes wakes its connection here through a waker that
//! queues the connection and writes an eventfd the ring always reads.
//!
//! Buffers the kernel holds never move: a receive goes into `rbuf`, which
//! nobody touches until it completes; a send goes from `sending`, which
//! the relay's new output never extends (it fills `Side::output`, swapped
//! in when the previous send is done). A connection's slot is freed only
//! when none of its operations is in flight.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, squeue, types, IoUring};

/// Entries in the submission queue (the completion queue is twice that);
/// a full queue is submitted and refilled, never an error.
const RING_ENTRIES: u32 = 256;
/// `user_data` of the eventfd read; otherwise `slot << 2 | side << 1 | send`.
const EVENTFD: u64 = u64::MAX;
/// `IORING_RECVSEND_POLL_FIRST` (Linux 5.19).
const POLL_FIRST: u16 = 1;
/// Smallest free room a receive is armed with.
const RECV_ROOM: usize = 256 << 10;

/// One socket's state on the ring.
pub(crate) struct RingIo {
    fd: OwnedFd,
    /// Where a receive lands; the kernel owns it while `recv_armed`.
    rbuf: Vec<u8>,
    recv_armed: bool,
    /// The relay asked for bytes (a receive is armed after its poll).
    want_recv: bool,
    /// A finished receive the relay has not taken yet (bytes, 0 at end of
    /// stream, or -errno).
    received: Option<i32>,
    /// Bytes being sent, from `sending_at`; the kernel reads them while
    /// `send_armed`.
    sending: Vec<u8>,
    sending_at: usize,
    send_armed: bool,
    send_error: Option<i32>,
}

impl RingIo {
    fn new(fd: OwnedFd) -> Self {
        RingIo {
            fd,
            rbuf: Vec::with_capacity(RECV_ROOM),
            recv_armed: false,
            want_recv: false,
            received: None,
            sending: Vec::with_capacity(64 << 10),
            sending_at: 0,
            send_armed: false,
            send_error: None,
        }
    }

    /// Bytes handed to the kernel (or waiting for the send in flight).
    pub(crate) fn in_flight(&self) -> usize {
        self.sending.len() - self.sending_at
    }

    /// What the last receive brought, into `input` (swapping buffers when
    /// `input` is empty, so a whole read is not copied): Ready(Ok(n)),
    /// Ready(Ok(0)) at end of stream, Pending until a receive finishes.
    pub(crate) fn take_received(&mut self, input: &mut Vec<u8>) -> Poll<std::io::Result<usize>> {
        let Some(r) = self.received.take() else {
            self.want_recv = true;
            return Poll::Pending;
        };
        if r < 0 {
            return Poll::Ready(Err(std::io::Error::from_raw_os_error(-r)));
        }
        let n = r as usize;
        if input.is_empty() {
            std::mem::swap(input, &mut self.rbuf);
        } else {
            input.extend_from_slice(&self.rbuf);
        }
        self.rbuf.clear();
        Poll::Ready(Ok(n))
    }

    /// Hands `output` to the kernel unless a send is still in flight
    /// (Pending then: its completion polls the relay again). Ready(Ok)
    /// means taken, not yet written; Ready(Err) for a socket that failed.
    pub(crate) fn take_output(&mut self, output: &mut Vec<u8>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.send_error.take() {
            return Poll::Ready(Err(std::io::Error::from_raw_os_error(e)));
        }
        if self.send_armed || self.in_flight() > 0 {
            return Poll::Pending;
        }
        if !output.is_empty() {
            self.sending.clear();
            self.sending_at = 0;
            std::mem::swap(output, &mut self.sending);
        }
        Poll::Ready(Ok(()))
    }

    /// Ends both directions, so that what is in flight completes.
    fn shut_down(&self) {
        // SAFETY: shutdown(2) on a descriptor this value owns.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    fn busy(&self) -> bool {
        self.recv_armed || self.send_armed
    }
}

/// A relayed connection as the driver sees it.
pub(crate) trait Relayed {
    /// Relays what it can; Ready once the connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// The kubelet's and containerd's sockets.
    fn sockets(&mut self) -> [&mut RingIo; 2];
}

/// What the threads that wake connections share with the driver.
struct Shared {
    woken: Mutex<Vec<usize>>,
    incoming: Mutex<Vec<Incoming>>,
    eventfd: OwnedFd,
}

/// Builds a connection around its two sockets, on the driver's thread.
pub(crate) type Make = Box<dyn FnOnce([RingIo; 2]) -> Box<dyn Relayed> + Send>;
type Incoming = ([OwnedFd; 2], Make);

impl Shared {
    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to the eventfd this value owns; a full
        // counter (never reached) would only make the write fail.
        unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

struct ConnWaker {
    slot: usize,
    shared: Arc<Shared>,
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.shared
            .woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.slot);
        self.shared.kick();
    }
}

/// The handle the accept loop gives connections to.
#[derive(Clone)]
pub(crate) struct Driver {
    shared: Arc<Shared>,
}

impl Driver {
    /// Starts the driver thread. Tokio tasks the relay spawns go to the
    /// runtime `handle` belongs to.
    pub(crate) fn start(handle: tokio::runtime::Handle) -> std::io::Result<Driver> {
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| std::io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            woken: Mutex::default(),
            incoming: Mutex::default(),
            // SAFETY: `efd` was just created and is owned by nothing else.
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
        });
        let driver = Driver {
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("cri-shim-uring".into())
            .spawn(move || {
                let _rt = handle.enter();
                if let Err(e) = Loop::new(ring, shared).run() {
                    // Nothing else drives the relayed connections: the
                    // shim cannot go on without it.
                    tracing::error!(error = %e, "the io_uring relay thread failed");
                    std::process::exit(1);
                }
            })?;
        Ok(driver)
    }

    /// Relays `kubelet` and `runtime` on the ring; `make` builds the
    /// connection around their [`RingIo`]s, on the driver's thread.
    pub(crate) fn add(&self, kubelet: OwnedFd, runtime: OwnedFd, make: Make) {
        lock(&self.shared.incoming).push(([kubelet, runtime], make));
        self.shared.kick();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    conn: Box<dyn Relayed>,
    waker: Waker,
    /// The relay is over; the slot goes once nothing is in flight.
    done: bool,
}

struct Loop {
    ring: IoUring,
    shared: Arc<Shared>,
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// The eventfd read's buffer (the kernel writes it while armed).
    counter: Box<[u8; 8]>,
    to_poll: Vec<usize>,
}

impl Loop {
    fn new(ring: IoUring, shared: Arc<Shared>) -> Self {
        Loop {
            ring,
            shared,
            slots: Vec::new(),
            free: Vec::new(),
            counter: Box::new([0; 8]),
            to_poll: Vec::new(),
        }
    }

    fn push(&mut self, e: &squeue::Entry) -> std::io::Result<()> {
        // SAFETY: every buffer an entry points at is owned by a slot that
        // is not freed while the operation is in flight (`Entry::done` and
        // `RingIo::busy`), or is `counter`, which lives as long as the loop.
        while unsafe { self.ring.submission().push(e) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn arm_eventfd(&mut self) -> std::io::Result<()> {
        let e = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.counter.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(EVENTFD);
        self.push(&e)
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.arm_eventfd()?;
        let mut done = Vec::new();
        loop {
            self.accept_incoming();
            self.to_poll
                .extend(std::mem::take(&mut *lock(&self.shared.woken)));
            self.to_poll.sort_unstable();
            self.to_poll.dedup();
            for slot in std::mem::take(&mut self.to_poll) {
                self.poll_slot(slot)?;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                // EBUSY: completions are waiting to be reaped (below).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (ud, res) in done.drain(..) {
                if ud == EVENTFD {
                    self.arm_eventfd()?;
                    continue;
                }
                self.completed(ud, res);
            }
        }
    }

    fn accept_incoming(&mut self) {
        let incoming = std::mem::take(&mut *lock(&self.shared.incoming));
        for ([k, c], make) in incoming {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let waker = Waker::from(Arc::new(ConnWaker {
                slot,
                shared: self.shared.clone(),
            }));
            self.slots[slot] = Some(Entry {
                conn: make([RingIo::new(k), RingIo::new(c)]),
                waker,
                done: false,
            });
            self.to_poll.push(slot);
        }
    }

    /// Polls the connection in `slot`, then arms what it asked for.
    fn poll_slot(&mut self, slot: usize) -> std::io::Result<()> {
        let Some(entry) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(()); // a late wake-up of a connection that is gone
        };
        if !entry.done {
            let waker = entry.waker.clone();
            let mut cx = Context::from_waker(&waker);
            if entry.conn.poll(&mut cx).is_ready() {
                entry.done = true;
                for io in entry.conn.sockets() {
                    io.shut_down();
                }
            }
        }
        let mut ops = Vec::new();
        let done = entry.done;
        for (side, io) in entry.conn.sockets().into_iter().enumerate() {
            let tag = (slot as u64) << 2 | (side as u64) << 1;
            if done {
                continue;
            }
            if io.want_recv && !io.recv_armed && io.received.is_none() {
                io.want_recv = false;
                io.recv_armed = true;
                io.rbuf.reserve(RECV_ROOM);
                let room = io.rbuf.capacity().min(u32::MAX as usize) as u32;
                // The relay just took what there was: wait for readiness
                // first instead of trying (and failing) a receive now.
                ops.push(
                    opcode::Recv::new(types::Fd(io.fd.as_raw_fd()), io.rbuf.as_mut_ptr(), room)
                        .ioprio(POLL_FIRST)
                        .build()
                        .user_data(tag),
                );
            }
            if !io.send_armed && io.in_flight() > 0 {
                io.send_armed = true;
                let rest = &io.sending[io.sending_at..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                ops.push(
                    opcode::Send::new(types::Fd(io.fd.as_raw_fd()), rest.as_ptr(), len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(tag | 1),
                );
            }
        }
        let idle = done && entry.conn.sockets().iter().all(|io| !io.busy());
        if idle {
            // Dropping the connection closes both sockets.
            self.slots[slot] = None;
            self.free.push(slot);
        }
        for op in &ops {
            self.push(op)?;
        }
        Ok(())
    }

    fn completed(&mut self, ud: u64, res: i32) {
        let slot = (ud >> 2) as usize;
        let Some(entry) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let [k, c] = entry.conn.sockets();
        let io = if ud & 2 == 0 { k } else { c };
        if ud & 1 == 0 {
            io.recv_armed = false;
            if res > 0 {
                // SAFETY: the kernel wrote `res` bytes at the start of
                // `rbuf` (empty when the receive was armed).
                unsafe { io.rbuf.set_len(res as usize) };
            }
            io.received = Some(res);
        } else {
            io.send_armed = false;
            match res {
                n if n > 0 => {
                    io.sending_at += n as usize;
                    if io.in_flight() == 0 {
                        io.sending.clear();
                        io.sending_at = 0;
                    }
                }
                n => {
                    // Nothing more goes out on a socket that failed.
                    io.send_error = Some(if n == 0 { libc::EPIPE } else { -n });
                    io.sending.clear();
                    io.sending_at = 0;
                }
            }
        }
        self.to_poll.push(slot);
    }
}
