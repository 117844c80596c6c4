//! The frame relay (`--relay frames`, see the README's "CRI shim"): each
//! kubelet connection gets a containerd connection of its own, and the
//! bytes between them pass as HTTP/2 frames, unparsed except for their
//! 9-byte headers. The two peers negotiate SETTINGS, PING and flow control
//! with each other, as if directly connected.
//!
//! What the shim still needs from the calls it reads:
//! - Every header block is decoded (never changed) with an HPACK decoder
//!   ([`crate::hpack`]) per direction, which keeps its dynamic table in step with the peer's:
//!   requests give the path (hooks, metrics) and `grpc-timeout`; answers
//!   give `grpc-status`.
//! - The request DATA of a hooked call is held back until the request is
//!   complete and [`Relay::prepare`] has run (RunPodSandbox waits there for
//!   the STARTING delivery, within its budget), then sent, changed only for
//!   CreateContainer's injection. Its HEADERS are not held: the order of
//!   header blocks, which HPACK depends on, stays as the kubelet sent it.
//! - The answer of a hooked call is copied as it passes, for
//!   [`Relay::complete`].
//!
//! Flow control: the kubelet keeps to the windows containerd grants, and
//! the shim forwards those grants. A CreateContainer grown by `k` bytes is
//! sent only if containerd's windows have room for it, and then `k` is
//! taken back out of containerd's next connection WINDOW_UPDATEs, so the
//! kubelet never believes in more room than containerd gave. Request bytes
//! the shim drops (a held call the kubelet cancelled, padding) are credited
//! back to the kubelet with a WINDOW_UPDATE of its own.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::grpc;
use crate::io::Socket;
use crate::relay::{Hooked, Prepared, Relay};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// RFC 9113's defaults, until containerd's SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;
const DEFAULT_MAX_FRAME: usize = 16_384;

/// Largest hooked request or answer kept whole (the kubelet's own limit).
const MAX_MESSAGE: usize = 16 << 20;
/// Largest frame the relay buffers (the largest SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = (1 << 24) - 1;
/// While this much waits to be written to one side, the other side is not
/// read (the peers' own flow control then pushes back).
const HIGH_WATER: usize = 1 << 20;
const READ_CHUNK: usize = 256 << 10;

/// Relays one kubelet connection over `runtime`, a fresh connection to
/// containerd, until either side closes. `active` counts open calls (the
/// graceful stop waits for them).
pub async fn serve(
    relay: Arc<Relay>,
    kubelet: tokio::net::UnixStream,
    runtime: tokio::net::UnixStream,
    active: Arc<AtomicUsize>,
) {
    let (k, c) = match (Socket::new(kubelet), Socket::new(runtime)) {
        (Ok(k), Ok(c)) => (k, c),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "registering a relayed connection");
            return;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut conn = Conn {
        relay,
        active,
        k: Side::new(k),
        c: Side::new(c),
        preface: PREFACE_LEN,
        up: HeaderBlocks::default(),
        down: HeaderBlocks::default(),
        streams: HashMap::default(),
        last_stream: 0,
        gone_message: String::new(),
        down_deferred: None,
        down_broken_at: None,
        c_stream_window: DEFAULT_WINDOW,
        c_max_frame: DEFAULT_MAX_FRAME,
        c_conn_window: DEFAULT_WINDOW,
        debt: 0,
        tx,
        rx,
    };
    std::future::poll_fn(|cx| conn.poll(cx)).await;
    if let Some(why) = conn.c.gone.take() {
        // containerd restarted (or stopped). The kubelet's HPACK state and
        // stream ids belong to this connection, so it cannot be carried
        // over to a new containerd connection: until containerd is back,
        // its calls are answered UNAVAILABLE naming the runtime (as the h2
        // relay answers); then a GOAWAY sends its client to a new
        // connection.
        tracing::info!(reason = %why, "runtime connection closed; answering UNAVAILABLE on this kubelet connection until the runtime is back");
        conn.refuse_open_calls(&why.to_string());
        let runtime = conn.relay.runtime_path().to_path_buf();
        tokio::select! {
            () = std::future::poll_fn(|cx| conn.poll_refusing(cx)) => {}
            () = crate::server::runtime_back(&runtime) => {
                tracing::info!("runtime reachable again; closing the kubelet connection (GOAWAY) so its next one is relayed to it");
                frame_header(&mut conn.k.output, 8, GOAWAY, 0, 0);
                conn.k.output.extend_from_slice(&conn.last_stream.to_be_bytes());
                conn.k.output.extend_from_slice(&0u32.to_be_bytes());
                let flush = std::future::poll_fn(|cx| conn.k.poll_flush(cx));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
            }
        }
    } else if let Some(why) = &conn.k.gone {
        tracing::debug!(reason = %why, "kubelet connection closed");
    }
    conn.finish();
}

/// One socket, what was read from it and not yet relayed, and what waits
/// to be written to it.
struct Side {
    sock: Socket,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    sent: usize,
    /// Why the socket is no longer used (end of stream, an error).
    gone: Option<std::io::Error>,
}

impl Side {
    fn new(sock: Socket) -> Self {
        Side {
            sock,
            input: Vec::with_capacity(READ_CHUNK),
            output: Vec::with_capacity(64 << 10),
            sent: 0,
            gone: None,
        }
    }

    fn read_result(&mut self, r: std::io::Result<usize>) {
        match r {
            Ok(0) => {
                self.gone = Some(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed by the peer",
                ))
            }
            Ok(_) => {}
            Err(e) => self.gone = Some(e),
        }
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Reads what the socket has (Ready(Ok(0)) at end of stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.input.capacity() - self.input.len() < 16 << 10 {
            self.input.reserve(READ_CHUNK);
        }
        let len = self.input.len();
        let mut rb = ReadBuf::uninit(self.input.spare_capacity_mut());
        std::task::ready!(Pin::new(&mut self.sock).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: poll_read initialised exactly the first `n` spare bytes.
        unsafe { self.input.set_len(len + n) };
        Poll::Ready(Ok(n))
    }

    /// Writes out what it can; Ready(Err) only for a broken socket.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.output.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.sock).poll_write(cx, &self.output[self.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.output.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// A header block being received (HEADERS or PUSH_PROMISE, then
/// CONTINUATION frames until END_HEADERS), and the decoder for one
/// direction.
#[derive(Default)]
struct HeaderBlocks {
    hpack: crate::hpack::Decoder,
    block: Vec<u8>,
    stream: u32,
    end_stream: bool,
    /// A header block did not decode: the peer will end the connection
    /// (its own decoder fails too); until then nothing more is read.
    broken: bool,
}

/// What the relay learnt from one header block.
#[derive(Default)]
struct Fields {
    path: Option<String>,
    timeout: Option<HeaderValue>,
    status: Option<u32>,
}

impl HeaderBlocks {
    /// Adds a fragment: `first` (stream, END_STREAM) for a HEADERS or
    /// PUSH_PROMISE, None for a CONTINUATION. True when the block is whole.
    fn add(&mut self, first: Option<(u32, bool)>, fragment: &[u8], flags: u8) -> bool {
        if let Some((id, end_stream)) = first {
            self.stream = id;
            self.end_stream = end_stream;
        }
        self.block.extend_from_slice(fragment);
        flags & END_HEADERS != 0
    }

    fn decode(&mut self) -> Option<Fields> {
        if self.broken {
            return None;
        }
        let mut f = Fields::default();
        let r = self.hpack.decode(&self.block, |n, v| match n {
            b":path" => f.path = Some(String::from_utf8_lossy(v).into_owned()),
            b"grpc-timeout" => f.timeout = HeaderValue::from_bytes(v).ok(),
            b"grpc-status" => f.status = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()),
            _ => {}
        });
        self.block.clear();
        match r {
            Ok(()) => Some(f),
            Err(e) => {
                tracing::warn!(error = ?e, "a header block did not decode; hooks are off for this connection");
                self.broken = true;
                None
            }
        }
    }
}

/// A call in flight.
struct Stream {
    path: String,
    start: Instant,
    answered: bool,
    hook: Option<Hook>,
}

/// A hooked call's state.
struct Hook {
    kind: Hooked,
    timeout: Option<HeaderValue>,
    /// Request payload held back (padding removed) and how many
    /// flow-controlled bytes the kubelet spent on it (padding included).
    held: Vec<u8>,
    held_flow: i64,
    state: HookState,
    /// containerd's window for this stream: what it granted minus what the
    /// shim sent.
    window: i64,
    answer: Vec<u8>,
    answer_whole: bool,
    status: Option<u32>,
}

enum HookState {
    /// Request DATA being held.
    Holding,
    /// The request is complete and `prepare` runs (RunPodSandbox's wait).
    Preparing,
    /// The request went on; the answer is being read.
    Sent(Box<Prepared>),
}

/// A `prepare` that had to wait, finished.
type Ready = (u32, Prepared);

struct Conn {
    relay: Arc<Relay>,
    active: Arc<AtomicUsize>,
    k: Side,
    c: Side,
    /// Client preface bytes still to pass before the kubelet's frames.
    preface: usize,
    /// Kubelet → containerd and containerd → kubelet header decoding.
    up: HeaderBlocks,
    down: HeaderBlocks,
    streams: HashMap<u32, Stream, BuildHasherDefault<StreamIdHasher>>,
    /// The highest stream the kubelet opened (for a GOAWAY).
    last_stream: u32,
    /// grpc-message of the calls answered after containerd went away.
    gone_message: String,
    /// While relaying one read of containerd's: bytes passed without
    /// copying ([`Conn::relay_runtime_frames`]), and where that ended.
    down_deferred: Option<usize>,
    down_broken_at: Option<usize>,
    /// containerd's SETTINGS: new streams' initial window, largest frame.
    c_stream_window: i64,
    c_max_frame: usize,
    /// containerd's connection window: granted minus what the shim sent.
    c_conn_window: i64,
    /// Connection credit containerd gave for bytes the kubelet did not
    /// send (a grown CreateContainer): kept back from its next grants.
    debt: i64,
    tx: mpsc::UnboundedSender<Ready>,
    rx: mpsc::UnboundedReceiver<Ready>,
}

impl Conn {
    /// Relays until one side is gone (its `gone` says why).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if self.k.gone.is_none() && self.c.pending() < HIGH_WATER {
                if let Poll::Ready(r) = self.k.poll_fill(cx) {
                    self.k.read_result(r);
                    if let Err(e) = self.relay_kubelet_frames() {
                        self.k.gone = Some(e);
                    }
                    progress = true;
                }
            }
            if self.c.gone.is_none() && self.k.pending() < HIGH_WATER {
                if let Poll::Ready(r) = self.c.poll_fill(cx) {
                    self.c.read_result(r);
                    if let Err(e) = self.relay_runtime_frames() {
                        self.c.gone = Some(e);
                    }
                    progress = true;
                }
            }
            while let Poll::Ready(Some((id, p))) = self.rx.poll_recv(cx) {
                self.prepared(id, p);
                progress = true;
            }
            for side in [&mut self.c, &mut self.k] {
                if side.pending() > 0 && side.gone.is_none() {
                    let before = side.pending();
                    if let Poll::Ready(Err(e)) = side.poll_flush(cx) {
                        side.gone = Some(e);
                    }
                    progress |= side.pending() != before;
                }
            }
            if self.k.gone.is_some() || self.c.gone.is_some() {
                // One peer is gone: the other's calls cannot complete.
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// containerd's connection ended: every call still open is answered
    /// UNAVAILABLE.
    fn refuse_open_calls(&mut self, why: &str) {
        self.gone_message = grpc::percent_encode(&format!(
            "nodeplane-cri-shim: runtime endpoint {}: connection closed ({why})",
            self.relay.runtime_path().display()
        ));
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(s) = self.streams.get(&id) else {
                continue;
            };
            let (path, start, answered) = (s.path.clone(), s.start, s.answered);
            self.unavailable(id, &path, start, answered);
            self.forget(id, None);
        }
    }

    /// Ends call `id` with grpc-status UNAVAILABLE (trailers-only unless
    /// containerd had sent its response headers).
    fn unavailable(&mut self, id: u32, path: &str, start: Instant, answered: bool) {
        self.relay.metrics.call(path, start.elapsed(), true);
        let mut block = Vec::new();
        if !answered {
            // :status 200 is static entry 8.
            block.push(0x88);
            literal(&mut block, b"content-type", b"application/grpc");
        }
        literal(&mut block, b"grpc-status", b"14");
        literal(&mut block, b"grpc-message", self.gone_message.as_bytes());
        frame_header(
            &mut self.k.output,
            block.len(),
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
        );
        self.k.output.extend_from_slice(&block);
    }

    /// With containerd gone: answers each new call UNAVAILABLE and keeps
    /// the connection itself alive (PING and SETTINGS acknowledged, request
    /// bytes credited back), until the kubelet leaves.
    fn poll_refusing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if let Poll::Ready(r) = self.k.poll_fill(cx) {
                self.k.read_result(r);
                let mut input = std::mem::take(&mut self.k.input);
                let (r, end) = each_frame(&input, 0, |ty, flags, id, frame| {
                    self.refuse_frame(ty, flags, id, &frame[FRAME_HEADER..])
                });
                input.drain(..end);
                self.k.input = input;
                if let Err(e) = r {
                    self.k.gone = Some(e);
                }
                progress = true;
            }
            if self.k.pending() > 0 {
                let before = self.k.pending();
                if let Poll::Ready(Err(e)) = self.k.poll_flush(cx) {
                    self.k.gone = Some(e);
                }
                progress |= self.k.pending() != before;
            }
            if self.k.gone.is_some() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn refuse_frame(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
        match ty {
            HEADERS | CONTINUATION => {
                let (first, fragment) = if ty == HEADERS {
                    (Some((id, false)), header_fragment(flags, payload))
                } else {
                    (None, Some(payload))
                };
                if self.up.add(first, fragment.unwrap_or_default(), flags) {
                    let id = self.up.stream;
                    let path = self.up.decode().and_then(|f| f.path).unwrap_or_default();
                    // Client stream ids only grow: a higher one is a new call.
                    if id > self.last_stream {
                        self.last_stream = id;
                        self.unavailable(id, &path, Instant::now(), false);
                    }
                }
            }
            DATA if !payload.is_empty() => {
                window_update(&mut self.k.output, 0, payload.len() as u32)
            }
            PING if flags & ACK == 0 => {
                frame_header(&mut self.k.output, payload.len(), PING, ACK, 0);
                self.k.output.extend_from_slice(payload);
            }
            SETTINGS if flags & ACK == 0 => frame_header(&mut self.k.output, 0, SETTINGS, ACK, 0),
            _ => {}
        }
    }

    /// Call `id` is over (answered, reset or refused).
    /// Request bytes still held then never reach containerd, which
    /// therefore never grants them back: the shim does. A call that was
    /// sent on whose answer was being read is reported failed, unless
    /// `answered_ok` says how it ended.
    fn forget(&mut self, id: u32, answered_ok: Option<bool>) {
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        self.active.fetch_sub(1, Ordering::Relaxed);
        let Some(h) = s.hook else { return };
        match h.state {
            HookState::Holding | HookState::Preparing => self.credit_kubelet(h.held_flow),
            HookState::Sent(p) => {
                let ok = answered_ok.unwrap_or(false);
                let answer = h.answer_whole.then(|| grpc::unframe(&h.answer)).flatten();
                self.relay.complete(*p, ok, answer);
            }
        }
    }

    /// The connection is over: open calls are no longer counted.
    fn finish(&mut self) {
        for _ in self.streams.drain() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Relays the kubelet's complete frames.
    fn relay_kubelet_frames(&mut self) -> std::io::Result<()> {
        let mut input = std::mem::take(&mut self.k.input);
        let mut at = 0;
        if self.preface > 0 {
            let n = self.preface.min(input.len());
            self.c.output.extend_from_slice(&input[..n]);
            self.preface -= n;
            at = n;
        }
        let r = if self.preface == 0 {
            let (r, end) = each_frame(&input, at, |ty, flags, id, frame| {
                self.kubelet_frame(ty, flags, id, frame)
            });
            input.drain(..end);
            r
        } else {
            input.clear();
            Ok(())
        };
        self.k.input = input;
        r
    }

    /// Relays containerd's complete frames.
    ///
    /// Answers are where the bytes are (a ListContainers answer is tens of
    /// KiB), and nearly all of them pass unchanged. So while every frame of
    /// a read passes unchanged to an empty kubelet output, nothing is
    /// copied: the read buffer itself becomes the output. The first frame
    /// that does not pass as it is (a WINDOW_UPDATE the shim changes, a
    /// credit it adds) ends that, and the frames deferred so far are put
    /// back in front at the end.
    fn relay_runtime_frames(&mut self) -> std::io::Result<()> {
        let mut input = std::mem::take(&mut self.c.input);
        self.down_deferred = self.k.output.is_empty().then_some(0);
        self.down_broken_at = None;
        let (r, end) = each_frame(&input, 0, |ty, flags, id, frame| {
            self.runtime_frame(ty, flags, id, frame)
        });
        if let Some(n) = self.down_deferred.take() {
            // All `end` bytes passed as they were (n == end).
            debug_assert_eq!(n, end);
            let mut rest = std::mem::take(&mut self.k.output);
            rest.extend_from_slice(&input[end..]);
            input.truncate(end);
            self.k.output = input;
            self.c.input = rest;
        } else {
            if let Some(n) = self.down_broken_at.take() {
                let after = std::mem::take(&mut self.k.output);
                self.k.output.reserve(n + after.len());
                self.k.output.extend_from_slice(&input[..n]);
                self.k.output.extend_from_slice(&after);
            }
            input.drain(..end);
            self.c.input = input;
        }
        r
    }

    /// The kubelet's output, for bytes other than containerd's frames as
    /// they came: frames deferred by [`Conn::relay_runtime_frames`] go
    /// first, so from here on frames are copied.
    fn down_out(&mut self) -> &mut Vec<u8> {
        if let Some(n) = self.down_deferred.take() {
            self.down_broken_at = Some(n);
        }
        &mut self.k.output
    }

    fn kubelet_frame(&mut self, ty: u8, flags: u8, id: u32, frame: &[u8]) {
        let payload = &frame[FRAME_HEADER..];
        match ty {
            DATA => {
                if let Some(h) = self.holding(id) {
                    let Some(data) = unpad(flags, payload) else {
                        return self.pass_up(frame);
                    };
                    h.held.extend_from_slice(data);
                    h.held_flow += payload.len() as i64;
                    if h.held.len() > MAX_MESSAGE + 5 {
                        // Not a message the shim reads: relayed as it is.
                        self.release_unchanged(id);
                    } else if flags & END_STREAM != 0 {
                        self.request_complete(id);
                    }
                    return;
                }
                self.c_conn_window -= payload.len() as i64;
                self.pass_up(frame);
            }
            HEADERS => {
                if self.holding(id).is_some() {
                    // Trailers after the request: the message is not read;
                    // its bytes go first, in order.
                    self.release_unchanged(id);
                }
                self.pass_up(frame);
                let first = Some((id, flags & END_STREAM != 0));
                let fragment = header_fragment(flags, payload).unwrap_or_default();
                if self.up.add(first, fragment, flags) {
                    self.request_headers();
                }
            }
            CONTINUATION => {
                self.pass_up(frame);
                if self.up.add(None, payload, flags) {
                    self.request_headers();
                }
            }
            RST_STREAM => {
                self.pass_up(frame);
                self.forget(id, None);
            }
            _ => self.pass_up(frame),
        }
    }

    fn runtime_frame(&mut self, ty: u8, flags: u8, id: u32, frame: &[u8]) {
        let payload = &frame[FRAME_HEADER..];
        match ty {
            SETTINGS if flags & ACK == 0 => {
                for s in payload.chunks_exact(6) {
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    match u16::from_be_bytes([s[0], s[1]]) {
                        SETTINGS_INITIAL_WINDOW_SIZE => {
                            // Applies to every open stream's window too.
                            let delta = i64::from(v) - self.c_stream_window;
                            self.c_stream_window = i64::from(v);
                            for h in self.streams.values_mut().filter_map(|s| s.hook.as_mut()) {
                                h.window += delta;
                            }
                        }
                        SETTINGS_MAX_FRAME_SIZE => self.c_max_frame = v as usize,
                        _ => {}
                    }
                }
                self.pass_down(frame);
            }
            WINDOW_UPDATE if payload.len() == 4 => {
                let inc = i64::from(
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                );
                if id != 0 {
                    if let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hook.as_mut()) {
                        h.window += inc;
                    }
                    return self.pass_down(frame);
                }
                self.c_conn_window += inc;
                let kept = self.debt.min(inc);
                self.debt -= kept;
                if kept == 0 {
                    self.pass_down(frame);
                } else {
                    let out = self.down_out();
                    if inc > kept {
                        window_update(out, 0, (inc - kept) as u32);
                    }
                }
            }
            DATA => {
                if let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hook.as_mut()) {
                    if let Some(data) = unpad(flags, payload) {
                        if h.answer.len() + data.len() <= MAX_MESSAGE + 5 {
                            h.answer.extend_from_slice(data);
                        } else {
                            h.answer_whole = false;
                        }
                    }
                }
                self.pass_down(frame);
                if flags & END_STREAM != 0 {
                    self.answer_complete(id);
                }
            }
            HEADERS | PUSH_PROMISE => {
                self.pass_down(frame);
                let fragment = if ty == HEADERS {
                    header_fragment(flags, payload)
                } else {
                    // Padding, then the promised stream's id, then the block.
                    unpad(flags, payload).and_then(|p| p.get(4..))
                };
                let first = Some((id, ty == HEADERS && flags & END_STREAM != 0));
                if self.down.add(first, fragment.unwrap_or_default(), flags) {
                    self.answer_headers();
                }
            }
            CONTINUATION => {
                self.pass_down(frame);
                if self.down.add(None, payload, flags) {
                    self.answer_headers();
                }
            }
            RST_STREAM => {
                self.pass_down(frame);
                self.forget(id, None);
            }
            _ => self.pass_down(frame),
        }
    }

    fn pass_up(&mut self, frame: &[u8]) {
        self.c.output.extend_from_slice(frame);
    }

    fn pass_down(&mut self, frame: &[u8]) {
        match &mut self.down_deferred {
            Some(n) => *n += frame.len(),
            None => self.k.output.extend_from_slice(frame),
        }
    }

    /// The hook of stream `id`, if its request DATA is being held.
    fn holding(&mut self, id: u32) -> Option<&mut Hook> {
        self.streams
            .get_mut(&id)?
            .hook
            .as_mut()
            .filter(|h| matches!(h.state, HookState::Holding))
    }

    /// A request's header block is complete: a new call (or trailers).
    fn request_headers(&mut self) {
        let (id, end_stream) = (self.up.stream, self.up.end_stream);
        let Some(f) = self.up.decode() else { return };
        let Some(path) = f.path else { return };
        if self.streams.contains_key(&id) {
            return;
        }
        self.last_stream = self.last_stream.max(id);
        // A hooked call without a body has no message to read.
        let kind = self.relay.hook_of(&path).filter(|_| !end_stream);
        self.streams.insert(
            id,
            Stream {
                path,
                start: Instant::now(),
                answered: false,
                hook: kind.map(|kind| Hook {
                    kind,
                    timeout: f.timeout,
                    held: Vec::new(),
                    held_flow: 0,
                    state: HookState::Holding,
                    window: self.c_stream_window,
                    answer: Vec::new(),
                    answer_whole: true,
                    status: None,
                }),
            },
        );
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A held request is complete: prepare its hook, now if nothing needs
    /// waiting for, else in a task of its own while other calls go on.
    fn request_complete(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let start = s.start;
        let Some(h) = s.hook.as_mut() else { return };
        let kind = h.kind;
        let Some(msg) = grpc::unframe(&h.held).map(Bytes::copy_from_slice) else {
            tracing::debug!(method = ?kind, "request not a single uncompressed message; relayed unhooked");
            return self.release_unchanged(id);
        };
        let mut headers = HeaderMap::new();
        if let Some(t) = h.timeout.take() {
            headers.insert("grpc-timeout", t);
        }
        h.state = HookState::Preparing;
        let relay = self.relay.clone();
        let mut fut = Box::pin(async move { relay.prepare(kind, &headers, &msg, start).await });
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(p) => self.prepared(id, p),
            Poll::Pending => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send((id, fut.await));
                });
            }
        }
    }

    /// A hook's request half is done: send the request on.
    fn prepared(&mut self, id: u32, mut p: Prepared) {
        let Some(h) = self.streams.get_mut(&id).and_then(|s| s.hook.as_mut()) else {
            // The kubelet cancelled the call meanwhile (its bytes were
            // credited back then).
            return;
        };
        let held = std::mem::take(&mut h.held);
        let body = match p.body.take() {
            Some(b) if (b.len() as i64) <= h.window.min(self.c_conn_window) => b,
            Some(b) => {
                tracing::warn!(grown = b.len(), window = h.window.min(self.c_conn_window),
                    "containerd's flow-control window has no room for the injection; CreateContainer relayed unchanged");
                Bytes::from(held)
            }
            None => Bytes::from(held),
        };
        let spent = h.held_flow;
        h.window -= body.len() as i64;
        h.state = HookState::Sent(Box::new(p));
        self.send_data(id, &body, true, spent);
    }

    /// Sends a held request's bytes as the kubelet sent them (trailers
    /// follow, or the shim does not read it) and stops reading the call.
    fn release_unchanged(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(h) = s.hook.take() else { return };
        self.send_data(id, &h.held, false, h.held_flow);
    }

    /// Sends `body` on stream `id` as DATA frames of containerd's largest
    /// size, accounting for the `spent` flow-controlled bytes the kubelet
    /// used for it.
    fn send_data(&mut self, id: u32, body: &[u8], end_stream: bool, spent: i64) {
        let mut chunks = body.chunks(self.c_max_frame.max(1)).peekable();
        if chunks.peek().is_none() && end_stream {
            frame_header(&mut self.c.output, 0, DATA, END_STREAM, id);
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let flags = if last && end_stream { END_STREAM } else { 0 };
            frame_header(&mut self.c.output, chunk.len(), DATA, flags, id);
            self.c.output.extend_from_slice(chunk);
        }
        self.c_conn_window -= body.len() as i64;
        let grown = body.len() as i64 - spent;
        if grown > 0 {
            self.debt += grown;
        } else {
            self.credit_kubelet(-grown);
        }
    }

    /// Grants the kubelet connection window for bytes it spent that
    /// containerd will not grant back.
    fn credit_kubelet(&mut self, n: i64) {
        // First against what containerd over-granted, then to the kubelet.
        let settled = self.debt.min(n);
        self.debt -= settled;
        if n > settled {
            window_update(self.down_out(), 0, (n - settled) as u32);
        }
    }

    /// An answer's header block is complete.
    fn answer_headers(&mut self) {
        let (id, end_stream) = (self.down.stream, self.down.end_stream);
        let f = self.down.decode();
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.answered {
                s.answered = true;
                self.relay.metrics.call(&s.path, s.start.elapsed(), false);
            }
            if let (Some(h), Some(status)) = (s.hook.as_mut(), f.and_then(|f| f.status)) {
                h.status = Some(status);
            }
        }
        if end_stream {
            self.answer_complete(id);
        }
    }

    /// containerd ended its side of a call.
    fn answer_complete(&mut self, id: u32) {
        let ok = self
            .streams
            .get(&id)
            .and_then(|s| s.hook.as_ref())
            .is_some_and(|h| h.status == Some(0));
        self.forget(id, Some(ok));
    }
}

/// Stream ids are unique and chosen by the kubelet's client, so a keyed
/// hash buys nothing; SipHash cost more per frame than the rest of the
/// frame's handling. Fibonacci hashing spreads the (odd, increasing) ids.
#[derive(Default)]
struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Calls `f` with each complete frame of `input` from `at` on (type,
/// flags, stream, the whole frame). Returns where the frames it handled
/// end: what follows is a partial frame, kept for the next read.
fn each_frame(
    input: &[u8],
    mut at: usize,
    mut f: impl FnMut(u8, u8, u32, &[u8]),
) -> (std::io::Result<()>, usize) {
    loop {
        match frame_at(&input[at..]) {
            Ok(Some((ty, flags, id, len))) => {
                f(ty, flags, id, &input[at..at + FRAME_HEADER + len]);
                at += FRAME_HEADER + len;
            }
            Ok(None) => return (Ok(()), at),
            Err(e) => return (Err(e), at),
        }
    }
}

/// The next complete frame at the start of `b`: (type, flags, stream, payload
/// length); None until it has all arrived.
fn frame_at(b: &[u8]) -> std::io::Result<Option<(u8, u8, u32, usize)>> {
    let Some(h) = b.get(..FRAME_HEADER) else {
        return Ok(None);
    };
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    if len > MAX_FRAME {
        return Err(std::io::Error::other("HTTP/2 frame larger than 16 MiB"));
    }
    if b.len() < FRAME_HEADER + len {
        return Ok(None);
    }
    let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Ok(Some((h[3], h[4], id, len)))
}

/// A DATA (or PUSH_PROMISE) payload without its padding; None if the
/// padding is longer than the frame (the peer rejects such a frame).
fn unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len().checked_sub(usize::from(pad)).map(|n| &rest[..n])
}

/// The header block fragment of a HEADERS payload.
fn header_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let p = unpad(flags, payload)?;
    if flags & PRIORITY != 0 {
        p.get(5..)
    } else {
        Some(p)
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, id: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&id.to_be_bytes());
}

/// A header field as an HPACK literal without indexing, with a literal
/// name and no Huffman coding: it leaves the kubelet's HPACK table as it
/// is, so containerd's header blocks that went before still decode.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    for s in [name, value] {
        hpack_integer(out, s.len(), 7, 0);
        out.extend_from_slice(s);
    }
}

/// RFC 7541 5.1: `v` with an N-bit prefix, the first byte's other bits `high`.
fn hpack_integer(out: &mut Vec<u8>, mut v: usize, prefix: u8, high: u8) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(high | v as u8);
        return;
    }
    out.push(high | max as u8);
    v -= max;
    while v >= 0x80 {
        out.push(0x80 | (v & 0x7f) as u8);
        v >>= 7;
    }
    out.push(v as u8);
}

fn window_update(out: &mut Vec<u8>, id: u32, inc: u32) {
    frame_header(out, 4, WINDOW_UPDATE, 0, id);
    out.extend_from_slice(&inc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; PREFACE_LEN] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn frames_are_found_only_when_whole() {
        let mut b = Vec::new();
        frame_header(&mut b, 3, DATA, END_STREAM, 5);
        b.extend_from_slice(b"abc");
        assert_eq!(frame_at(&b[..11]).expect("test input"), None);
        assert_eq!(
            frame_at(&b).expect("test input"),
            Some((DATA, END_STREAM, 5, 3))
        );
        assert!(frame_at(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]).is_ok());
    }

    #[test]
    fn padding_and_priority_are_skipped() {
        assert_eq!(unpad(0, b"xyz"), Some(&b"xyz"[..]));
        assert_eq!(unpad(PADDED, b"\x02abcpp"), Some(&b"abc"[..]));
        assert_eq!(unpad(PADDED, b"\x09ab"), None);
        assert_eq!(
            header_fragment(PRIORITY, b"\0\0\0\x03\x10hdr"),
            Some(&b"hdr"[..])
        );
        assert_eq!(
            header_fragment(PADDED | PRIORITY, b"\x01\0\0\0\x03\x10hdrp"),
            Some(&b"hdr"[..])
        );
    }

    #[test]
    fn synthesized_fields_decode_and_leave_the_table_alone() {
        let long = "m".repeat(300);
        let mut block = vec![0x88];
        literal(&mut block, b"grpc-status", b"14");
        literal(&mut block, b"grpc-message", long.as_bytes());
        let mut d = crate::hpack::Decoder::default();
        let mut got = Vec::new();
        d.decode(&block, |n, v| got.push((n.to_vec(), v.to_vec())))
            .expect("test input");
        assert_eq!(
            got,
            [
                (b":status".to_vec(), b"200".to_vec()),
                (b"grpc-status".to_vec(), b"14".to_vec()),
                (b"grpc-message".to_vec(), long.into_bytes()),
            ]
        );
        // Nothing was added: index 62 does not exist.
        assert!(d.decode(&[0xbe], |_, _| {}).is_err());
    }

    #[test]
    fn window_update_encodes_its_increment() {
        let mut b = Vec::new();
        window_update(&mut b, 0, 70_000);
        assert_eq!(b, [0, 0, 4, WINDOW_UPDATE, 0, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    /// The kubelet's and containerd's ends of a frame relay on socket
    /// pairs, with injection on.
    async fn relayed() -> (tokio::net::UnixStream, tokio::net::UnixStream) {
        use clap::Parser;
        let cfg = crate::Args::parse_from([
            "nodeplane-cri-shim",
            "--listen=unix:///nonexistent/cri.sock",
            "--runtime-endpoint=unix:///nonexistent/containerd.sock",
            "--runtime-dir=/run/nodeplane-test",
        ])
        .into_config()
        .expect("config");
        let relay = Arc::new(Relay::new(cfg, None));
        let (kubelet, k_shim) = tokio::net::UnixStream::pair().expect("pair");
        let (c_shim, containerd) = tokio::net::UnixStream::pair().expect("pair");
        tokio::spawn(serve(relay, k_shim, c_shim, Arc::default()));
        (kubelet, containerd)
    }

    async fn read_frame(s: &mut tokio::net::UnixStream) -> (u8, u8, u32, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut h = [0u8; FRAME_HEADER];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut h))
            .await
            .expect("a frame within 5 s")
            .expect("read");
        let (ty, flags, id, len) = frame_at(&[&h[..], &vec![0; 1 << 16]].concat())
            .expect("frame")
            .expect("whole");
        let mut p = vec![0; len];
        s.read_exact(&mut p).await.expect("payload");
        (ty, flags, id, p)
    }

    fn frame(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        frame_header(&mut b, payload.len(), ty, flags, id);
        b.extend_from_slice(payload);
        b
    }

    fn create_container_call() -> (Vec<u8>, Vec<u8>) {
        use k8s_cri::v1 as cri;
        use prost::Message;
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: "sb-1".into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
            sandbox_config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "web-0".into(),
                    uid: "uid-1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                ..Default::default()
            }),
        };
        let mut headers = vec![0x83]; // :method POST
        literal(
            &mut headers,
            b":path",
            b"/runtime.v1.RuntimeService/CreateContainer",
        );
        (headers, grpc::frame(&req.encode_to_vec()).to_vec())
    }

    #[tokio::test]
    async fn grown_create_container_is_taken_out_of_containerds_grants() {
        use tokio::io::AsyncWriteExt;
        let (mut kubelet, mut containerd) = relayed().await;
        let (headers, body) = create_container_call();
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out.extend(frame(HEADERS, END_HEADERS, 1, &headers));
        // Padded, so the kubelet spends 1 + body + 4 bytes of window.
        let mut padded = vec![4];
        padded.extend_from_slice(&body);
        padded.extend_from_slice(&[0; 4]);
        out.extend(frame(DATA, END_STREAM | PADDED, 1, &padded));
        kubelet.write_all(&out).await.expect("write");

        read_preface(&mut containerd).await;
        assert_eq!(read_frame(&mut containerd).await.0, SETTINGS);
        let (ty, _, id, h) = read_frame(&mut containerd).await;
        assert_eq!(
            (ty, id, &h),
            (HEADERS, 1, &headers),
            "header block unchanged"
        );
        let (ty, flags, _, data) = read_frame(&mut containerd).await;
        assert_eq!((ty, flags), (DATA, END_STREAM));
        let msg = grpc::unframe(&data).expect("one message");
        let req = crate::inject::decode(msg).expect("decodes");
        let env = req.config.expect("config").envs;
        assert!(env.iter().any(|e| e.key == "DAPR_HTTP_ENDPOINT"), "{env:?}");
        let grown = data.len() as i64 - padded.len() as i64;
        assert!(grown > 0);

        // containerd grants back what it received: the kubelet gets that
        // minus the growth, so its window matches containerd's again.
        // In one read with frames that pass as they are, before and after
        // (the changed one must keep its place).
        let mut answer = vec![0x88];
        literal(&mut answer, b"content-type", b"application/grpc");
        let mut out = frame(HEADERS, END_HEADERS, 1, &answer);
        out.extend(frame(
            WINDOW_UPDATE,
            0,
            0,
            &(data.len() as u32).to_be_bytes(),
        ));
        out.extend(frame(PING, 0, 0, &[7; 8]));
        containerd.write_all(&out).await.expect("write");
        let (ty, _, id, block) = read_frame(&mut kubelet).await;
        assert_eq!((ty, id, block), (HEADERS, 1, answer));
        let (ty, _, id, inc) = read_frame(&mut kubelet).await;
        assert_eq!((ty, id), (WINDOW_UPDATE, 0));
        let inc = u32::from_be_bytes(inc.try_into().expect("4 bytes"));
        assert_eq!(i64::from(inc), data.len() as i64 - grown);
        let (ty, _, _, ping) = read_frame(&mut kubelet).await;
        assert_eq!((ty, ping), (PING, vec![7; 8]));
    }

    #[tokio::test]
    async fn create_container_goes_unchanged_when_containerds_window_is_too_small() {
        use tokio::io::AsyncWriteExt;
        let (mut kubelet, mut containerd) = relayed().await;
        let (headers, body) = create_container_call();
        // containerd's streams may receive just this call's own bytes.
        let mut settings = SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        settings.extend_from_slice(&(body.len() as u32).to_be_bytes());
        containerd
            .write_all(&frame(SETTINGS, 0, 0, &settings))
            .await
            .expect("write");
        assert_eq!(read_frame(&mut kubelet).await.0, SETTINGS);
        let mut out = PREFACE.to_vec();
        out.extend(frame(HEADERS, END_HEADERS, 1, &headers));
        out.extend(frame(DATA, END_STREAM, 1, &body));
        kubelet.write_all(&out).await.expect("write");
        read_preface(&mut containerd).await;
        assert_eq!(read_frame(&mut containerd).await.0, HEADERS);
        let (ty, _, _, data) = read_frame(&mut containerd).await;
        assert_eq!((ty, &data), (DATA, &body), "relayed as the kubelet sent it");
    }

    async fn read_preface(s: &mut tokio::net::UnixStream) {
        let mut preface = [0u8; PREFACE_LEN];
        tokio::io::AsyncReadExt::read_exact(s, &mut preface)
            .await
            .expect("preface");
        assert_eq!(&preface, PREFACE);
    }

    #[tokio::test]
    async fn a_held_call_the_kubelet_resets_is_credited_back_to_it() {
        use tokio::io::AsyncWriteExt;
        let (mut kubelet, mut containerd) = relayed().await;
        let (headers, body) = create_container_call();
        let half = &body[..body.len() / 2];
        let mut out = PREFACE.to_vec();
        out.extend(frame(HEADERS, END_HEADERS, 1, &headers));
        // Half the request, held; then the kubelet gives up (CANCEL = 8).
        out.extend(frame(DATA, 0, 1, half));
        out.extend(frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
        kubelet.write_all(&out).await.expect("write");
        read_preface(&mut containerd).await;
        assert_eq!(read_frame(&mut containerd).await.0, HEADERS);
        let (ty, _, id, _) = read_frame(&mut containerd).await;
        assert_eq!(
            (ty, id),
            (RST_STREAM, 1),
            "the held DATA is dropped, the reset passes"
        );
        // containerd never saw those bytes, so the shim grants them back.
        let (ty, _, id, inc) = read_frame(&mut kubelet).await;
        assert_eq!((ty, id), (WINDOW_UPDATE, 0));
        assert_eq!(
            u32::from_be_bytes(inc.try_into().expect("4 bytes")) as usize,
            half.len()
        );
    }

    #[tokio::test]
    async fn a_header_block_split_over_continuation_frames_is_read_whole() {
        use tokio::io::AsyncWriteExt;
        let (mut kubelet, mut containerd) = relayed().await;
        let (headers, body) = create_container_call();
        let (a, b) = headers.split_at(headers.len() / 2);
        let mut out = PREFACE.to_vec();
        out.extend(frame(HEADERS, 0, 1, a));
        out.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        // The body in two frames, and a PING of the kubelet's in between.
        let (b1, b2) = body.split_at(7);
        out.extend(frame(DATA, 0, 1, b1));
        out.extend(frame(PING, 0, 0, &[1; 8]));
        out.extend(frame(DATA, END_STREAM, 1, b2));
        kubelet.write_all(&out).await.expect("write");
        read_preface(&mut containerd).await;
        assert_eq!(read_frame(&mut containerd).await.3, a);
        assert_eq!(read_frame(&mut containerd).await.3, b);
        // The PING is not held with the call's DATA.
        assert_eq!(read_frame(&mut containerd).await.0, PING);
        let (ty, flags, _, data) = read_frame(&mut containerd).await;
        assert_eq!((ty, flags), (DATA, END_STREAM));
        assert!(data.len() > body.len(), "injected");
        assert!(
            data.starts_with(&[0]) && data[5..].starts_with(&body[5..]),
            "the kubelet's bytes come first"
        );
    }

    #[tokio::test]
    async fn a_held_call_containerd_answers_early_is_credited_back_too() {
        use tokio::io::AsyncWriteExt;
        let (mut kubelet, mut containerd) = relayed().await;
        let (headers, body) = create_container_call();
        let half = &body[..body.len() / 2];
        let mut out = PREFACE.to_vec();
        out.extend(frame(HEADERS, END_HEADERS, 1, &headers));
        out.extend(frame(DATA, 0, 1, half));
        kubelet.write_all(&out).await.expect("write");
        read_preface(&mut containerd).await;
        assert_eq!(read_frame(&mut containerd).await.0, HEADERS);
        // containerd refuses the call at once (trailers-only, RESOURCE_EXHAUSTED).
        let mut answer = vec![0x88];
        literal(&mut answer, b"grpc-status", b"8");
        containerd
            .write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &answer))
            .await
            .expect("write");
        let (ty, _, id, block) = read_frame(&mut kubelet).await;
        assert_eq!(
            (ty, id, block),
            (HEADERS, 1, answer),
            "the answer passes as it came"
        );
        let (ty, _, id, inc) = read_frame(&mut kubelet).await;
        assert_eq!((ty, id), (WINDOW_UPDATE, 0));
        assert_eq!(
            u32::from_be_bytes(inc.try_into().expect("4 bytes")) as usize,
            half.len()
        );
    }
}
