//! Element updates to nodeplane's table over nf_tables netlink.
//!
//! A policy change is usually nothing but element adds and deletes
//! ([`crate::nft::Script::elements_only`]). `nft -f` parses such a
//! transaction at about 20 µs per element (a pod's label change can touch
//! thousands), so these go to the kernel as one netlink batch instead:
//! BATCH_BEGIN, NEWSETELEM/DELSETELEM messages, BATCH_END. The kernel
//! applies a batch atomically, as it does `nft -f`'s; if it refuses one,
//! nothing changed and the caller falls back to `nft -f` with the same
//! transaction. Everything structural (chains, rules, sets, counters)
//! stays with `nft -f`.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsRawFd;

use netlink_sys::{Socket, SocketAddr};

use crate::nft::{Elem, Field, Script, Step, Value};
use crate::{Error, Result};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_OBJREF: u16 = 9;
const NFTA_SET_ELEM_KEY_END: u16 = 10;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const IFNAMSIZ: usize = 16;

/// Elements per message: the element list is one attribute, whose length
/// field is 16 bits.
const PER_MESSAGE: usize = 400;

/// Applies `script`, which must be [`Script::elements_only`], in one batch.
pub fn apply(script: &Script) -> Result<()> {
    let err = |what: &str, e: io::Error| Error::Nft(format!("netlink {what}: {e}"));
    let mut batch = Batch::default();
    batch.begin();
    for step in &script.steps {
        match step {
            Step::Text(t) if t.trim().is_empty() => {}
            Step::Text(t) => {
                return Err(Error::Nft(format!(
                    "netlink carries only element updates, not `{}`",
                    t.lines().next().unwrap_or("")
                )))
            }
            Step::Elements { add, set, elems } => {
                for chunk in elems.chunks(PER_MESSAGE) {
                    batch.elements(*add, &script.table, set, chunk)?;
                }
            }
        }
    }
    batch.end();
    let mut cached = SOCKET.lock().unwrap_or_else(|e| e.into_inner());
    let netns = current_netns().map_err(|e| err("netns", e))?;
    let sock = match cached.take() {
        Some((ns, sock)) if ns == netns => sock,
        _ => open().map_err(|e| err("socket", e))?,
    };
    drain(&sock);
    batch.send(&sock).map_err(|e| err("batch", e))?;
    // Only a socket whose batch was answered in full is kept: after an
    // error, acks may still be on their way.
    *cached = Some((netns, sock));
    Ok(())
}

/// The socket of the last batch and the network namespace it was opened
/// in, kept open. Closing a netfilter netlink socket after a transaction
/// that removed elements waits until the kernel has freed them (an RCU
/// grace period: 5–13 ms on these machines, a third of a whole policy
/// change); a kept socket never pays that on the path of a change. The
/// namespace is compared on every use, because a socket programs the
/// namespace it was opened in, whatever the calling thread's is now.
static SOCKET: std::sync::Mutex<Option<(u64, Socket)>> = std::sync::Mutex::new(None);

fn current_netns() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Discards whatever an earlier batch left unread on a kept socket.
fn drain(sock: &Socket) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        if !matches!(sock.recv(&mut buf, libc::MSG_DONTWAIT), Ok(n) if n > 0) {
            return;
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(sock)
}

#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Messages that asked for an ack.
    acked: Vec<u32>,
}

impl Batch {
    /// Starts a message; returns where its header is, to patch the length.
    fn header(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        self.seq = self.seq.wrapping_add(1);
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf
            .extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, res_id (big endian).
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn finish(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn begin(&mut self) {
        let at = self.header(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES);
        self.finish(at);
    }

    fn end(&mut self) {
        let at = self.header(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES);
        self.finish(at);
    }

    fn elements(&mut self, add: bool, table: &str, set: &str, elems: &[Elem]) -> Result<()> {
        let (msg, flags) = if add {
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_ACK)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_ACK)
        };
        let at = self.header((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, NFPROTO_INET, 0);
        self.acked.push(self.seq);
        let b = &mut self.buf;
        put_str(b, NFTA_SET_ELEM_LIST_TABLE, table);
        put_str(b, NFTA_SET_ELEM_LIST_SET, set);
        let list = nest(b, NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elems {
            let item = nest(b, NFTA_LIST_ELEM);
            let key = nest(b, NFTA_SET_ELEM_KEY);
            put(b, NFTA_DATA_VALUE, &key_bytes(&e.key)?);
            end_nest(b, key);
            if let Some(end) = &e.end {
                let k = nest(b, NFTA_SET_ELEM_KEY_END);
                put(b, NFTA_DATA_VALUE, &key_bytes(end)?);
                end_nest(b, k);
            }
            if add {
                match &e.value {
                    Value::None => {}
                    Value::Counter(name) => put_str(b, NFTA_SET_ELEM_OBJREF, name),
                    Value::Jump(chain) => {
                        let data = nest(b, NFTA_SET_ELEM_DATA);
                        let verdict = nest(b, NFTA_DATA_VERDICT);
                        put(b, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                        put_str(b, NFTA_VERDICT_CHAIN, chain);
                        end_nest(b, verdict);
                        end_nest(b, data);
                    }
                }
            }
            end_nest(b, item);
        }
        if b.len() - list > usize::from(u16::MAX) {
            return Err(Error::Nft(format!(
                "element list for {set} too long for one netlink attribute"
            )));
        }
        end_nest(b, list);
        self.finish(at);
        Ok(())
    }

    /// Sends the batch and waits for every ack; the first error wins.
    fn send(&self, sock: &Socket) -> io::Result<()> {
        let fd = sock.as_raw_fd();
        let want = (self.buf.len() * 2).max(1 << 20) as libc::c_int;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            // SAFETY: setsockopt with a valid fd and an int-sized value.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&want as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: as above, with a timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        sock.send(&self.buf, 0)?;
        let mut pending: HashSet<u32> = self.acked.iter().copied().collect();
        let mut first_err: Option<io::Error> = None;
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        while !pending.is_empty() {
            buf.clear();
            let n = match sock.recv(&mut buf, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            let data = &buf[..n.min(buf.len())];
            let mut off = 0;
            while off + 16 <= data.len() {
                let len =
                    u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                        as usize;
                if len < 16 || off + len > data.len() {
                    break;
                }
                let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
                let seq = u32::from_ne_bytes([
                    data[off + 8],
                    data[off + 9],
                    data[off + 10],
                    data[off + 11],
                ]);
                if ty == NLMSG_ERROR && off + 20 <= data.len() {
                    let code = i32::from_ne_bytes([
                        data[off + 16],
                        data[off + 17],
                        data[off + 18],
                        data[off + 19],
                    ]);
                    pending.remove(&seq);
                    if code != 0 && first_err.is_none() {
                        first_err = Some(io::Error::from_raw_os_error(-code));
                    }
                }
                off += (len + 3) & !3;
            }
            if first_err.is_some() {
                // The kernel aborted the whole batch; later acks may not come.
                break;
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// A key's bytes: each field in network order, padded to 4 bytes (the
/// kernel's register granularity, as `nft` lays out concatenations).
fn key_bytes(fields: &[Field]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for f in fields {
        match f {
            Field::V4(a) => out.extend_from_slice(&a.octets()),
            Field::V6(a) => out.extend_from_slice(&a.octets()),
            Field::Proto(p) => out.extend_from_slice(&[*p, 0, 0, 0]),
            Field::Port(p) => {
                out.extend_from_slice(&p.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Field::Iface(name) => {
                let mut b = [0u8; IFNAMSIZ];
                let n = name.as_bytes();
                if n.len() >= IFNAMSIZ {
                    return Err(Error::Nft(format!("interface name {name} too long")));
                }
                b[..n.len()].copy_from_slice(n);
                out.extend_from_slice(&b);
            }
            Field::Text(t) => {
                return Err(Error::Nft(format!(
                    "`{t}` needs nft -f (not an element netlink can carry)"
                )))
            }
        }
    }
    Ok(out)
}

fn put(b: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize((b.len() + 3) & !3, 0);
}

fn put_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    put(b, ty, &v);
}

fn nest(b: &mut Vec<u8>, ty: u16) -> usize {
    let at = b.len();
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nest(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u16;
    b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_pad_each_field_to_four_bytes() {
        let k = key_bytes(&[
            Field::V4("10.244.0.7".parse().expect("ip")),
            Field::Proto(6),
            Field::Port(8080),
        ])
        .expect("key");
        assert_eq!(k, [10, 244, 0, 7, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        let k = key_bytes(&[Field::Iface("np0a".into())]).expect("key");
        assert_eq!(k.len(), 16);
        assert!(key_bytes(&[Field::Text("10.0.0.0/8".into())]).is_err());
    }
}
