//! An experiment, not a relay: every kubelet connection's calls are
//! multiplexed onto ONE containerd connection, to measure what that is
//! worth before building it into the shim. The frame relay pairs each
//! kubelet connection with a containerd connection of its own; here the
//! requests that several clients sent in one wake-up go to containerd in
//! one write, and containerd answers many calls per read and write.
//!
//! It ends HTTP/2 on both sides in the simplest way that carries the
//! bench's calls: stream ids are renumbered, header blocks are decoded
//! (the shim's HPACK decoder) and re-encoded as literals, SETTINGS and
//! PINGs are answered here, and flow control is not enforced (it grants
//! containerd a window it never exhausts and trusts the clients' large
//! windows). Single-threaded, level-triggered epoll. It takes the shim's
//! command line (`--listen`, `--runtime-endpoint`), so
//! `NODEPLANE_CRI_SHIM_BIN=<this binary> cri-bench` measures it.

use nodeplane_tests::cri::shim_arg;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use nodeplane_cri_shim::hpack::Decoder;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Token of the listener and of containerd's connection in epoll.
const LISTENER: u64 = u64::MAX;
const UPSTREAM: u64 = u64::MAX - 1;

/// A decoded header block: stream, END_STREAM, fields.
type Block = (u32, bool, Vec<(Vec<u8>, Vec<u8>)>);

/// One socket with what was read and not yet handled, and what waits to
/// be written.
struct Peer {
    sock: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes at the front of `input` to skip (the client preface).
    preface: usize,
    decoder: Decoder,
    /// A header block being received: stream, END_STREAM, fragments.
    block: Option<(u32, bool, Vec<u8>)>,
    /// EPOLLOUT registered (a write found the socket full).
    want_out: bool,
    /// DATA bytes received and not yet given back by a WINDOW_UPDATE.
    credit: u32,
}

impl Peer {
    fn new(sock: UnixStream, preface: usize) -> Self {
        sock.set_nonblocking(true).expect("nonblocking");
        Peer {
            sock,
            input: Vec::with_capacity(256 << 10),
            output: Vec::with_capacity(64 << 10),
            preface,
            decoder: Decoder::default(),
            block: None,
            want_out: false,
            credit: 0,
        }
    }

    /// Reads what is there; false at end of stream or on an error.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 64 << 10];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Writes what it can; false on a broken socket.
    fn flush(&mut self) -> bool {
        let mut sent = 0;
        while sent < self.output.len() {
            match self.sock.write(&self.output[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.output.drain(..sent);
        true
    }

    /// Whole frames of `input` (type, flags, stream, payload), consumed.
    fn frames(&mut self) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut at = 0;
        if self.preface > 0 {
            let n = self.preface.min(self.input.len());
            self.preface -= n;
            at = n;
        }
        let mut out = Vec::new();
        while self.input.len() - at >= 9 {
            let h = &self.input[at..at + 9];
            let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
            if self.input.len() - at < 9 + len {
                break;
            }
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            out.push((h[3], h[4], id, self.input[at + 9..at + 9 + len].to_vec()));
            at += 9 + len;
        }
        self.input.drain(..at);
        out
    }

    /// Adds a header fragment; the decoded fields once the block is whole.
    fn header_block(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) -> Option<Block> {
        let mut p = payload;
        if ty == HEADERS {
            if flags & PADDED != 0 {
                let pad = *p.first()? as usize;
                p = p.get(1..p.len().checked_sub(pad)?)?;
            }
            if flags & PRIORITY != 0 {
                p = p.get(5..)?;
            }
            self.block = Some((id, flags & END_STREAM != 0, Vec::new()));
        }
        let (_, _, frag) = self.block.as_mut()?;
        frag.extend_from_slice(p);
        if flags & END_HEADERS == 0 {
            return None;
        }
        let (id, end, frag) = self.block.take()?;
        let mut fields = Vec::new();
        self.decoder
            .decode(&frag, |n, v| fields.push((n.to_vec(), v.to_vec())))
            .ok()?;
        Some((id, end, fields))
    }
}

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, id: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

fn integer(out: &mut Vec<u8>, mut v: usize, prefix: u8) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literals without indexing (no dynamic table used).
fn encode(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    for (n, v) in fields {
        b.push(0);
        integer(&mut b, n.len(), 7);
        b.extend_from_slice(n);
        integer(&mut b, v.len(), 7);
        b.extend_from_slice(v);
    }
    b
}

fn epoll_add(ep: i32, fd: i32, token: u64, events: u32, op: i32) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: plain syscall on descriptors this process owns.
    let r = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    assert!(r == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

struct Pump {
    ep: i32,
    up: Peer,
    clients: HashMap<u64, Peer>,
    next_token: u64,
    next_up_id: u32,
    /// containerd stream → (client token, client stream).
    streams: HashMap<u32, (u64, u32)>,
    /// (client token, client stream) → containerd stream.
    by_client: HashMap<(u64, u32), u32>,
    /// DATA bytes received from containerd since the last WINDOW_UPDATE.
    consumed: u64,
}

impl Pump {
    fn client_frames(&mut self, token: u64) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        for (ty, flags, id, payload) in c.frames() {
            match ty {
                SETTINGS if flags & 1 == 0 => frame(&mut c.output, SETTINGS, 1, 0, &[]),
                PING if flags & 1 == 0 => frame(&mut c.output, PING, 1, 0, &payload),
                HEADERS | CONTINUATION => {
                    let Some((id, end, fields)) = c.header_block(ty, flags, id, &payload) else {
                        continue;
                    };
                    let up_id = *self.by_client.entry((token, id)).or_insert_with(|| {
                        let u = self.next_up_id;
                        self.next_up_id += 2;
                        self.streams.insert(u, (token, id));
                        u
                    });
                    let fl = END_HEADERS | if end { END_STREAM } else { 0 };
                    frame(&mut self.up.output, HEADERS, fl, up_id, &encode(&fields));
                }
                DATA => {
                    c.credit += payload.len() as u32;
                    if let Some(&u) = self.by_client.get(&(token, id)) {
                        frame(&mut self.up.output, DATA, flags & END_STREAM, u, &payload);
                    }
                }
                RST_STREAM => {
                    if let Some(u) = self.by_client.remove(&(token, id)) {
                        self.streams.remove(&u);
                        frame(&mut self.up.output, RST_STREAM, 0, u, &payload);
                    }
                }
                _ => {}
            }
        }
        // The clients keep to the 65,535-byte connection window of the
        // SETTINGS sent them: give back what they used.
        if c.credit >= 16 << 10 {
            frame(&mut c.output, 8, 0, 0, &c.credit.to_be_bytes());
            c.credit = 0;
        }
    }

    fn upstream_frames(&mut self) {
        for (ty, flags, id, payload) in self.up.frames() {
            match ty {
                SETTINGS if flags & 1 == 0 => frame(&mut self.up.output, SETTINGS, 1, 0, &[]),
                PING if flags & 1 == 0 => frame(&mut self.up.output, PING, 1, 0, &payload),
                GOAWAY => {
                    eprintln!("cri-mux-pump: containerd sent GOAWAY; exiting");
                    std::process::exit(1);
                }
                HEADERS | CONTINUATION => {
                    let Some((id, end, fields)) = self.up.header_block(ty, flags, id, &payload)
                    else {
                        continue;
                    };
                    let Some(&(token, cid)) = self.streams.get(&id) else {
                        continue;
                    };
                    if end {
                        self.streams.remove(&id);
                        self.by_client.remove(&(token, cid));
                    }
                    if let Some(c) = self.clients.get_mut(&token) {
                        let fl = END_HEADERS | if end { END_STREAM } else { 0 };
                        frame(&mut c.output, HEADERS, fl, cid, &encode(&fields));
                    }
                }
                DATA => {
                    self.consumed += payload.len() as u64;
                    let Some(&(token, cid)) = self.streams.get(&id) else {
                        continue;
                    };
                    if flags & END_STREAM != 0 {
                        self.streams.remove(&id);
                        self.by_client.remove(&(token, cid));
                    }
                    if let Some(c) = self.clients.get_mut(&token) {
                        frame(&mut c.output, DATA, flags & END_STREAM, cid, &payload);
                    }
                }
                RST_STREAM => {
                    if let Some((token, cid)) = self.streams.remove(&id) {
                        self.by_client.remove(&(token, cid));
                        if let Some(c) = self.clients.get_mut(&token) {
                            frame(&mut c.output, RST_STREAM, 0, cid, &payload);
                        }
                    }
                }
                _ => {}
            }
        }
        if self.consumed > 1 << 30 {
            let inc = (self.consumed as u32).to_be_bytes();
            frame(&mut self.up.output, 8, 0, 0, &inc);
            self.consumed = 0;
        }
    }

    fn flush(&mut self, token: u64) -> bool {
        let (peer, fd_token) = if token == UPSTREAM {
            (&mut self.up, UPSTREAM)
        } else {
            match self.clients.get_mut(&token) {
                Some(c) => (c, token),
                None => return true,
            }
        };
        if !peer.flush() {
            return false;
        }
        let want = !peer.output.is_empty();
        if want != peer.want_out {
            peer.want_out = want;
            let ev = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
            epoll_add(
                self.ep,
                peer.sock.as_raw_fd(),
                fd_token,
                ev,
                libc::EPOLL_CTL_MOD,
            );
        }
        true
    }
}

fn main() {
    let (Some(listen), Some(runtime)) = (shim_arg("listen"), shim_arg("runtime-endpoint")) else {
        eprintln!(
            "usage: cri-mux-pump --listen=unix://PATH --runtime-endpoint=unix://PATH [ignored...]"
        );
        std::process::exit(2);
    };
    // SIGTERM's default action ends the process, which is all the bench needs.
    let up = UnixStream::connect(&runtime)
        .unwrap_or_else(|e| panic!("connect {}: {e}", runtime.display()));
    let _ = std::fs::remove_file(&listen);
    let listener =
        UnixListener::bind(&listen).unwrap_or_else(|e| panic!("bind {}: {e}", listen.display()));
    listener.set_nonblocking(true).expect("nonblocking");
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    let mut up = Peer::new(up, 0);
    up.output.extend_from_slice(PREFACE);
    // Stream windows of 2^31-1 and the connection's raised to match:
    // containerd never waits for a WINDOW_UPDATE in the bench.
    let mut settings = vec![0, 4];
    settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    frame(&mut up.output, SETTINGS, 0, 0, &settings);
    frame(
        &mut up.output,
        8,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    );
    epoll_add(
        ep,
        up.sock.as_raw_fd(),
        UPSTREAM,
        libc::EPOLLIN as u32,
        libc::EPOLL_CTL_ADD,
    );
    epoll_add(
        ep,
        listener.as_raw_fd(),
        LISTENER,
        libc::EPOLLIN as u32,
        libc::EPOLL_CTL_ADD,
    );
    let mut p = Pump {
        ep,
        up,
        clients: HashMap::new(),
        next_token: 0,
        next_up_id: 1,
        streams: HashMap::new(),
        by_client: HashMap::new(),
        consumed: 0,
    };
    p.flush(UPSTREAM);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut dirty: Vec<u64> = Vec::new();
    loop {
        // SAFETY: `events` has room for 64 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
        if n < 0 {
            continue;
        }
        dirty.clear();
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == LISTENER {
                while let Ok((s, _)) = listener.accept() {
                    let t = p.next_token;
                    p.next_token += 1;
                    let mut c = Peer::new(s, PREFACE.len());
                    frame(&mut c.output, SETTINGS, 0, 0, &[]);
                    epoll_add(
                        ep,
                        c.sock.as_raw_fd(),
                        t,
                        libc::EPOLLIN as u32,
                        libc::EPOLL_CTL_ADD,
                    );
                    p.clients.insert(t, c);
                    dirty.push(t);
                }
                continue;
            }
            let readable =
                ev.events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            if token == UPSTREAM {
                if readable {
                    if !p.up.fill() {
                        eprintln!("cri-mux-pump: containerd closed the connection; exiting");
                        std::process::exit(1);
                    }
                    p.upstream_frames();
                    dirty.extend(p.clients.keys().copied());
                }
                dirty.push(UPSTREAM);
                continue;
            }
            if readable {
                let alive = p.clients.get_mut(&token).is_some_and(Peer::fill);
                if !alive {
                    if let Some(c) = p.clients.remove(&token) {
                        epoll_add(ep, c.sock.as_raw_fd(), token, 0, libc::EPOLL_CTL_DEL);
                    }
                    p.by_client.retain(|(t, _), _| *t != token);
                    p.streams.retain(|_, (t, _)| *t != token);
                    continue;
                }
                p.client_frames(token);
                dirty.push(UPSTREAM);
            }
            dirty.push(token);
        }
        // Everything read in this wake-up goes out in one write per socket.
        dirty.sort_unstable();
        dirty.dedup();
        for &t in &dirty {
            let has_output = if t == UPSTREAM {
                !p.up.output.is_empty()
            } else {
                p.clients.get(&t).is_some_and(|c| !c.output.is_empty())
            };
            if has_output && !p.flush(t) && t == UPSTREAM {
                eprintln!("cri-mux-pump: writing to containerd failed; exiting");
                std::process::exit(1);
            }
        }
    }
}
