//! `cri-pump` on io_uring: the same byte pump (one containerd connection
//! per client connection, 256 KiB per direction, no HTTP/2 parsing, no
//! hooks), driven by one io_uring on one thread instead of epoll and
//! read/write. It measures what batching a relay's socket calls is worth on
//! this machine: one `io_uring_enter` submits the sends and receives of
//! every connection that is ready and collects their completions, where an
//! epoll relay makes a read, a write and (usually) an epoll_wait per message.
//! Same command line as the shim (only `--listen` and `--runtime-endpoint`
//! are read), so
//! `NODEPLANE_CRI_SHIM_BIN=<this binary> cri-bench` runs it in the shim's
//! place. A measuring tool, not a relay: it hooks nothing, and a connection's
//! buffers are kept until the process exits (a bench opens 17).

use nodeplane_tests::cri::shim_arg;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use io_uring::{opcode, squeue, types, IoUring};

const BUF: usize = 256 << 10;
/// `user_data` of the listener's accept; otherwise `direction << 1 | send`.
const ACCEPT: u64 = u64::MAX;

/// One direction of a connection pair: received bytes go out to `to`
/// before the next receive is armed, so at most one operation per
/// direction is in flight and `buf` never changes under the kernel.
struct Direction {
    from: RawFd,
    to: RawFd,
    buf: Vec<u8>,
    len: usize,
    sent: usize,
    peer: usize,
    dead: bool,
}

fn push(ring: &mut IoUring, e: &squeue::Entry) -> std::io::Result<()> {
    // SAFETY: every buffer an entry points at lives in a `Direction` that
    // is never dropped or resized while the process runs.
    while unsafe { ring.submission().push(e) }.is_err() {
        ring.submit()?;
    }
    Ok(())
}

fn recv(d: &mut Direction, slot: usize) -> squeue::Entry {
    opcode::Recv::new(types::Fd(d.from), d.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data((slot as u64) << 1)
}

fn main() -> std::io::Result<()> {
    let (Some(listen), Some(runtime)) = (shim_arg("listen"), shim_arg("runtime-endpoint")) else {
        eprintln!(
            "usage: cri-uring-pump --listen=unix://PATH --runtime-endpoint=unix://PATH [ignored...]"
        );
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&listen);
    let listener = UnixListener::bind(&listen)
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {}: {e}", listen.display())))?;
    let mut ring = IoUring::new(1024)
        .map_err(|e| std::io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?;
    let accept = opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT);
    push(&mut ring, &accept)?;
    let mut dirs: Vec<Direction> = Vec::new();
    let mut done = Vec::new();
    loop {
        ring.submit_and_wait(1)?;
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, res) in done.drain(..) {
            if ud == ACCEPT {
                push(&mut ring, &accept)?;
                if res < 0 {
                    continue;
                }
                let Ok(up) = UnixStream::connect(&runtime) else {
                    // The client sees its connection closed.
                    eprintln!("cri-uring-pump: connect {}: refused", runtime.display());
                    // SAFETY: `res` is the descriptor accept just returned.
                    unsafe { libc::close(res) };
                    continue;
                };
                let (down, up) = (res, up.into_raw_fd());
                let a = dirs.len();
                for (from, to, peer) in [(down, up, a + 1), (up, down, a)] {
                    dirs.push(Direction {
                        from,
                        to,
                        buf: vec![0; BUF],
                        len: 0,
                        sent: 0,
                        peer,
                        dead: false,
                    });
                }
                for slot in [a, a + 1] {
                    let e = recv(&mut dirs[slot], slot);
                    push(&mut ring, &e)?;
                }
                continue;
            }
            let slot = (ud >> 1) as usize;
            let d = &mut dirs[slot];
            if d.dead {
                continue;
            }
            if res <= 0 {
                // Either side closed or failed: end both directions.
                let (from, to, peer) = (d.from, d.to, d.peer);
                d.dead = true;
                dirs[peer].dead = true;
                // SAFETY: shutdown(2) on descriptors this process owns.
                unsafe {
                    libc::shutdown(from, libc::SHUT_RDWR);
                    libc::shutdown(to, libc::SHUT_RDWR);
                }
                continue;
            }
            if ud & 1 == 0 {
                (d.len, d.sent) = (res as usize, 0);
            } else {
                d.sent += res as usize;
            }
            let e = if d.sent < d.len {
                let rest = d.buf[d.sent..d.len].as_ptr();
                opcode::Send::new(types::Fd(d.to), rest, (d.len - d.sent) as u32)
                    .build()
                    .user_data((slot as u64) << 1 | 1)
            } else {
                recv(d, slot)
            };
            push(&mut ring, &e)?;
        }
    }
}
