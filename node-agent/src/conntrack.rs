//! Cutting connections a policy change denies. Conntrack would otherwise
//! keep passing an established connection (the `established` rule comes
//! before policy), so after each change every entry that involves a local
//! pod is checked against the new rules and the denied ones are deleted.
//! The table's "no new connection without SYN" rule then keeps the next
//! packet of such a connection from being picked up again mid-stream.
//!
//! Speaks ctnetlink directly (NETLINK_NETFILTER): one dump per address
//! family and one batch of deletes, each naming an entry by the original
//! tuple the dump returned. Spawning the `conntrack` tool instead cost
//! about 10 ms per call, on every policy change.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::{Socket, SocketAddr};

use crate::policy::Compiled;
use crate::{Error, Result};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_PROTOINFO: u16 = 4;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
/// A dump of every family.
const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;

/// One entry's original direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// A TCP entry in TIME_WAIT or CLOSE: no connection left to cut.
    pub dead: bool,
}

/// A dumped entry: its flow, and what names it in a delete request.
#[derive(Debug, Clone)]
struct Entry {
    flow: Flow,
    family: u8,
    /// The CTA_TUPLE_ORIG attribute as the kernel sent it, and CTA_ZONE.
    key: Vec<u8>,
}

/// Deletes the entries from or to the local pod addresses in `exposed`
/// that `rules` no longer allows; returns how many entries were cut. TCP
/// entries already in TIME_WAIT or CLOSE carry no traffic and are left to
/// expire. Only the families of the exposed addresses are dumped, both in
/// one dump when there are both: every dump walks the kernel's whole hash
/// table (262,144 buckets here, about 9 ms), whatever the family.
pub fn cut_denied(rules: &Compiled, exposed: &HashSet<IpAddr>) -> Result<usize> {
    let local = exposed;
    let family = match (
        local.iter().any(IpAddr::is_ipv4),
        local.iter().any(IpAddr::is_ipv6),
    ) {
        (true, true) => AF_UNSPEC,
        (true, false) => AF_INET,
        (false, true) => AF_INET6,
        (false, false) => return Ok(0),
    };
    let mut ct = Ctnl::new().map_err(|e| Error::Conntrack(format!("open ctnetlink: {e}")))?;
    let entries = ct
        .dump(family)
        .map_err(|e| Error::Conntrack(format!("dump the conntrack table: {e}")))?;
    let denied: Vec<Entry> = entries
        .into_iter()
        .filter(|e| {
            let f = &e.flow;
            !f.dead
                && (local.contains(&f.src) || local.contains(&f.dst))
                && !rules.allows(f.src, f.dst, f.proto, f.dport.unwrap_or(0))
        })
        .collect();
    ct.delete(&denied)
        .map_err(|e| Error::Conntrack(format!("delete denied entries: {e}")))
}

/// A ctnetlink socket in the calling thread's network namespace.
struct Ctnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Ctnl {
    fn new() -> io::Result<Ctnl> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Ctnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Appends one request (header, nfgenmsg, `attrs`); returns its seq.
    fn request(
        &mut self,
        out: &mut Vec<u8>,
        msg: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
    ) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
        out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
        out.extend_from_slice(attrs);
        self.seq
    }

    /// Receives one datagram: its (type, seq, payload after nlmsghdr) messages.
    fn recv(&mut self) -> io::Result<Vec<(u16, u32, Vec<u8>)>> {
        self.buf.clear();
        let n = loop {
            match self.sock.recv(&mut self.buf, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        let data = &self.buf[..n.min(self.buf.len())];
        let mut out = Vec::new();
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32_at(data, off) as usize;
            if len < 16 || off + len > data.len() {
                break;
            }
            let ty = u16::from_ne_bytes([data[off + 4], data[off + 5]]);
            let seq = u32_at(data, off + 8);
            out.push((ty, seq, data[off + 16..off + len].to_vec()));
            off += align(len);
        }
        Ok(out)
    }

    fn dump(&mut self, family: u8) -> io::Result<Vec<Entry>> {
        let mut req = Vec::new();
        let seq = self.request(&mut req, IPCTNL_MSG_CT_GET, NLM_F_DUMP, family, &[]);
        self.sock.send(&req, 0)?;
        let mut entries = Vec::new();
        loop {
            for (ty, s, payload) in self.recv()? {
                if s != seq {
                    continue;
                }
                match ty {
                    NLMSG_DONE => return Ok(entries),
                    NLMSG_ERROR => {
                        let code = payload.get(..4).map_or(0, |b| i32_at(b, 0));
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    // nfgenmsg's family is the entry's own (a dump of
                    // AF_UNSPEC holds both).
                    _ => {
                        let family = payload.first().copied().unwrap_or(family);
                        entries.extend(parse_entry(family, payload.get(4..).unwrap_or(&[])))
                    }
                }
            }
        }
    }

    /// Deletes `entries` in one batch; an entry already gone is fine.
    fn delete(&mut self, entries: &[Entry]) -> io::Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut req = Vec::new();
        let mut pending = std::collections::HashSet::new();
        for e in entries {
            let seq = self.request(&mut req, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, e.family, &e.key);
            pending.insert(seq);
        }
        self.sock.send(&req, 0)?;
        let mut cut = 0;
        while !pending.is_empty() {
            for (ty, seq, payload) in self.recv()? {
                if ty != NLMSG_ERROR || !pending.remove(&seq) {
                    continue;
                }
                match payload.get(..4).map_or(0, |b| i32_at(b, 0)) {
                    0 => cut += 1,
                    code if -code == libc::ENOENT => {}
                    code => return Err(io::Error::from_raw_os_error(-code)),
                }
            }
        }
        Ok(cut)
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn i32_at(b: &[u8], off: usize) -> i32 {
    u32_at(b, off) as i32
}

/// The attributes in `b`: (type without flags, payload, the whole attribute).
fn attrs(b: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > b.len() {
            break;
        }
        out.push((ty, &b[off + 4..off + len], &b[off..off + len]));
        off += align(len);
    }
    out
}

fn find(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).into_iter().find(|a| a.0 == ty).map(|a| a.1)
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn parse_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()),
        16 => {
            let a: [u8; 16] = b.try_into().ok()?;
            Some(Ipv6Addr::from(a).into())
        }
        _ => None,
    }
}

/// One dumped entry (the attributes after nfgenmsg).
fn parse_entry(family: u8, b: &[u8]) -> Option<Entry> {
    let list = attrs(b);
    let (_, orig, orig_whole) = list.iter().find(|a| a.0 == CTA_TUPLE_ORIG)?;
    let ip = find(orig, CTA_TUPLE_IP)?;
    let (src_ty, dst_ty) = if family == AF_INET {
        (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    } else {
        (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    };
    let src = parse_ip(find(ip, src_ty)?)?;
    let dst = parse_ip(find(ip, dst_ty)?)?;
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    let num = *find(proto, CTA_PROTO_NUM)?.first()?;
    let state = find(b, CTA_PROTOINFO)
        .and_then(|p| find(p, CTA_PROTOINFO_TCP))
        .and_then(|t| find(t, CTA_PROTOINFO_TCP_STATE))
        .and_then(|s| s.first().copied());
    let mut key = orig_whole.to_vec();
    if let Some((_, _, zone)) = list.iter().find(|a| a.0 == CTA_ZONE) {
        key.extend_from_slice(zone);
        key.resize(align(key.len()), 0);
    }
    Some(Entry {
        flow: Flow {
            proto: num,
            src,
            dst,
            sport: find(proto, CTA_PROTO_SRC_PORT).and_then(be16),
            dport: find(proto, CTA_PROTO_DST_PORT).and_then(be16),
            dead: matches!(state, Some(TCP_CONNTRACK_TIME_WAIT | TCP_CONNTRACK_CLOSE)),
        },
        family,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(align(v.len()), 0);
        v
    }

    #[test]
    fn parses_a_dumped_tcp_entry() {
        let ip = [
            attr(CTA_IP_V4_SRC, &[10, 244, 0, 2]),
            attr(CTA_IP_V4_DST, &[10, 244, 0, 3]),
        ]
        .concat();
        let proto = [
            attr(CTA_PROTO_NUM, &[6]),
            attr(CTA_PROTO_SRC_PORT, &41234u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &80u16.to_be_bytes()),
        ]
        .concat();
        let orig = attr(
            CTA_TUPLE_ORIG | 0x8000,
            &[
                attr(CTA_TUPLE_IP | 0x8000, &ip),
                attr(CTA_TUPLE_PROTO | 0x8000, &proto),
            ]
            .concat(),
        );
        let info = attr(
            CTA_PROTOINFO | 0x8000,
            &attr(
                CTA_PROTOINFO_TCP | 0x8000,
                &attr(CTA_PROTOINFO_TCP_STATE, &[3]),
            ),
        );
        let e = parse_entry(AF_INET, &[orig.clone(), info].concat()).expect("entry");
        assert_eq!(e.flow.src, "10.244.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(e.flow.dport, Some(80));
        assert_eq!(e.flow.sport, Some(41234));
        assert_eq!(e.flow.proto, 6);
        assert!(!e.flow.dead);
        assert_eq!(
            e.key, orig,
            "a delete names the entry by its original tuple"
        );
    }
}
