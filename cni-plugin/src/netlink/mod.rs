//! A small synchronous rtnetlink client: just the requests pod wiring needs.
//!
//! Synchronous on purpose: the plugin is a short-lived process on the pod
//! start-up path, and a blocking socket with batched requests costs less than
//! starting an async runtime. Requests that belong together are sent in one
//! `send(2)` and their acknowledgements collected afterwards.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Routes nodeplane installs carry this protocol number, so they can be told
/// apart from everyone else's when cleaning up (`ip route show proto 0x6e`).
pub const ROUTE_PROTOCOL: u8 = 0x6e;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub alias: Option<String>,
    /// veth peers report their peer's ifindex here.
    pub link: Option<u32>,
    /// Operationally up (IF_OPER_UP): the kernel's link watcher has seen the
    /// carrier and attached the real qdisc, so packets are no longer dropped.
    pub oper_up: bool,
}

/// An address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: u8,
}

/// One request of a batch, with a label used in error messages.
#[derive(Debug)]
pub struct Request {
    pub what: String,
    msg: RouteNetlinkMessage,
    flags: u16,
}

#[cfg(test)]
pub mod fake;

/// The rtnetlink operations pod wiring needs. [`Rtnl`] talks to the kernel;
/// the recording fake in `fake` lets the wiring logic be unit-tested
/// without root.
pub trait Netlink {
    /// Sends requests in one datagram; the first refusal, labelled.
    fn batch(&mut self, requests: Vec<Request>) -> Result<(), Failed>;
    /// The link called `name`, or `None`.
    fn link(&mut self, name: &str) -> io::Result<Option<Link>>;
    fn links(&mut self) -> io::Result<Vec<Link>>;
    fn addrs(&mut self) -> io::Result<Vec<Addr>>;
    /// Routes of the main table, both families.
    fn routes(&mut self) -> io::Result<Vec<Route>>;
    /// Addresses this namespace accepts packets for: the destinations of the
    /// local table's `local` routes, both families.
    fn local_ips(&mut self) -> io::Result<Vec<IpAddr>>;
    /// One request, acknowledged.
    fn request(&mut self, r: Request) -> Result<(), Failed> {
        self.batch(vec![r])
    }
}

impl Netlink for Rtnl {
    fn batch(&mut self, requests: Vec<Request>) -> Result<(), Failed> {
        self.send_batch(requests)
    }
    fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        self.get_link(name)
    }
    fn links(&mut self) -> io::Result<Vec<Link>> {
        self.dump_links()
    }
    fn addrs(&mut self) -> io::Result<Vec<Addr>> {
        self.dump_addrs()
    }
    fn routes(&mut self) -> io::Result<Vec<Route>> {
        self.dump_routes()
    }
    fn local_ips(&mut self) -> io::Result<Vec<IpAddr>> {
        self.dump_local_ips()
    }
}

/// A request of a batch the kernel refused: which one, and the errno.
#[derive(Debug)]
pub struct Failed {
    pub what: String,
    pub source: io::Error,
}

impl Failed {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl From<io::Error> for Failed {
    fn from(source: io::Error) -> Failed {
        Failed {
            what: "netlink socket".into(),
            source,
        }
    }
}

impl From<Failed> for crate::Error {
    fn from(f: Failed) -> crate::Error {
        crate::Error::netlink(f.what, f.source)
    }
}

/// A netlink route socket bound to one network namespace.
#[derive(Debug)]
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn full_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

impl Rtnl {
    /// A socket in the calling thread's current network namespace.
    pub fn new() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Extended acks make the kernel explain EINVAL and friends.
        let _ = sock.set_ext_ack(true);
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// A socket inside the namespace `ns`. A netlink socket stays bound to the
    /// namespace it was created in, so we enter `ns` just long enough to create
    /// it, then return: the process never works "inside" the pod.
    pub fn in_netns(ns: &File) -> io::Result<Rtnl> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(ns)?;
        let made = Rtnl::new();
        setns(&home)?;
        made
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn encode(&mut self, msg: RouteNetlinkMessage, flags: u16, out: &mut Vec<u8>) -> u32 {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let start = out.len();
        out.resize(start + nl.buffer_len(), 0);
        nl.serialize(&mut out[start..]);
        seq
    }

    /// Sends every request in one datagram and waits for all their acks.
    /// Returns the first failure, labelled with its request.
    fn send_batch(&mut self, requests: Vec<Request>) -> Result<(), Failed> {
        if requests.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(512 * requests.len());
        let mut pending = Vec::with_capacity(requests.len());
        for r in requests {
            let seq = self.encode(r.msg, r.flags | NLM_F_ACK, &mut out);
            pending.push((seq, r.what));
        }
        self.sock.send(&out, 0)?;
        let mut first_err: Option<Failed> = None;
        let mut remaining = pending.len();
        while remaining > 0 {
            for (seq, payload) in self.recv()? {
                if let NetlinkPayload::Error(e) = payload {
                    if let Some(pos) = pending.iter().position(|(s, _)| *s == seq) {
                        remaining -= 1;
                        if e.code.is_some() && first_err.is_none() {
                            first_err = Some(Failed {
                                what: pending[pos].1.clone(),
                                source: e.to_io(),
                            });
                        }
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn recv(&mut self) -> io::Result<Vec<(u32, NetlinkPayload<RouteNetlinkMessage>)>> {
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
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            if len < 16 || off + len > data.len() {
                break;
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            out.push((msg.header.sequence_number, msg.payload));
            off += (len + 3) & !3;
        }
        Ok(out)
    }

    /// Runs a dump request and returns every message it produced.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        let seq = self.encode(msg, NLM_F_DUMP, &mut out);
        self.sock.send(&out, 0)?;
        let mut msgs = Vec::new();
        loop {
            for (s, payload) in self.recv()? {
                if s != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::InnerMessage(m) => msgs.push(m),
                    NetlinkPayload::Done(_) => return Ok(msgs),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
        }
    }

    /// The link called `name`, or `None` when there is no such link.
    fn get_link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let mut out = Vec::new();
        let seq = self.encode(RouteNetlinkMessage::GetLink(msg), 0, &mut out);
        self.sock.send(&out, 0)?;
        loop {
            for (s, payload) in self.recv()? {
                if s != seq {
                    continue;
                }
                match payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                        return Ok(Some(to_link(&m)))
                    }
                    NetlinkPayload::Error(e) => {
                        let err = e.to_io();
                        return match err.raw_os_error() {
                            Some(libc::ENODEV) => Ok(None),
                            _ => Err(err),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Every link in the namespace.
    fn dump_links(&mut self) -> io::Result<Vec<Link>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(to_link(l)),
                _ => None,
            })
            .collect())
    }

    /// Every address in the namespace.
    fn dump_addrs(&mut self) -> io::Result<Vec<Addr>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let ip = ip.or_else(|| {
                        a.attributes.iter().find_map(|at| match at {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some(Addr {
                        index: a.header.index,
                        ip,
                        prefix: a.header.prefix_len,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Every route of the main table, both families.
    fn dump_routes(&mut self) -> io::Result<Vec<Route>> {
        Ok(self
            .dump_route_msgs()?
            .iter()
            .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN)
            .filter_map(to_route)
            .collect())
    }

    /// Destinations of the `local` routes of the local table, both families.
    fn dump_local_ips(&mut self) -> io::Result<Vec<IpAddr>> {
        const RT_TABLE_LOCAL: u8 = 255;
        Ok(self
            .dump_route_msgs()?
            .iter()
            .filter(|r| r.header.table == RT_TABLE_LOCAL && r.header.kind == RouteType::Local)
            .filter_map(|r| to_route(r).map(|route| route.dst))
            .collect())
    }

    /// Every route of every table, IPv4 then IPv6.
    fn dump_route_msgs(&mut self) -> io::Result<Vec<RouteMessage>> {
        let mut all = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = fam;
            for m in self.dump(RouteNetlinkMessage::GetRoute(req))? {
                if let RouteNetlinkMessage::NewRoute(r) = m {
                    all.push(r);
                }
            }
        }
        Ok(all)
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace fd we hold open; no memory is involved.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        alias: None,
        link: None,
        oper_up: false,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(mac) => l.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
            LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
            LinkAttribute::Link(i) => l.link = Some(*i),
            LinkAttribute::OperState(s) => l.oper_up = *s == State::Up,
            _ => {}
        }
    }
    l
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn to_route(r: &RouteMessage) -> Option<Route> {
    let v4 = r.header.address_family == AddressFamily::Inet;
    let mut route = Route {
        dst: if v4 {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u8; 16])
        },
        prefix: r.header.destination_prefix_length,
        gateway: None,
        oif: None,
        protocol: r.header.protocol.into(),
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => route.dst = route_ip(d)?,
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            _ => {}
        }
    }
    Some(route)
}

// ---- request builders -------------------------------------------------------

/// Create a veth pair, both ends up: `host` in this namespace and `peer`
/// created directly inside the namespace `peer_ns` (no second move step).
pub fn new_veth(
    host: &str,
    host_mac: [u8; 6],
    peer: &str,
    peer_mac: [u8; 6],
    peer_ns: &File,
    mtu: u32,
) -> Request {
    // The peer cannot be created up: veth_open fails with ENOTCONN until the
    // pair is linked, which happens after the peer is configured. See `set_up`.
    let mut p = LinkMessage::default();
    p.attributes = vec![
        LinkAttribute::IfName(peer.to_string()),
        LinkAttribute::Address(peer_mac.to_vec()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::NetNsFd(peer_ns.as_raw_fd()),
    ];
    let mut h = LinkMessage::default();
    h.header.flags = LinkFlags::Up;
    h.header.change_mask = LinkFlags::Up;
    h.attributes = vec![
        LinkAttribute::IfName(host.to_string()),
        LinkAttribute::Address(host_mac.to_vec()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]),
    ];
    Request {
        what: format!("create veth {host} <-> {peer}"),
        msg: RouteNetlinkMessage::NewLink(h),
        flags: NLM_F_CREATE | NLM_F_EXCL,
    }
}

/// Set a link's alias (`ip link set NAME alias ...`). Separate from
/// creation because RTM_NEWLINK ignores IFLA_IFALIAS for new devices; sent in
/// the same batch, so it costs no extra round trip.
pub fn set_alias(name: &str, alias: &str) -> Request {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
    Request {
        what: format!("set alias of {name}"),
        msg: RouteNetlinkMessage::SetLink(m),
        flags: 0,
    }
}

/// Bring a link up.
pub fn set_up(index: u32) -> Request {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    Request {
        what: format!("set link {index} up"),
        msg: RouteNetlinkMessage::SetLink(m),
        flags: 0,
    }
}

/// Delete a link by index (stable, unlike a name another link may take).
pub fn del_link_index(index: u32) -> Request {
    let mut m = LinkMessage::default();
    m.header.index = index;
    Request {
        what: format!("delete link {index}"),
        msg: RouteNetlinkMessage::DelLink(m),
        flags: 0,
    }
}

/// Add `ip/prefix` to a link; IPv6 skips duplicate address detection, which
/// would otherwise leave the address unusable for a second or more.
pub fn add_addr(index: u32, ip: IpAddr, prefix: u8) -> Request {
    let mut m = AddressMessage::default();
    m.header.family = family(&ip);
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(ip));
    m.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv6() {
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    Request {
        what: format!("add address {ip}/{prefix}"),
        msg: RouteNetlinkMessage::NewAddress(m),
        flags: NLM_F_CREATE | NLM_F_REPLACE,
    }
}

fn route_msg(dst: IpAddr, prefix: u8, gateway: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&dst);
    m.header.destination_prefix_length = prefix;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    m.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    m.header.kind = RouteType::Unicast;
    if prefix > 0 {
        m.attributes.push(RouteAttribute::Destination(dst.into()));
    }
    if let Some(gw) = gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// Add (or replace) a route out of link `oif`, via `gateway` if given.
pub fn add_route(dst: IpAddr, prefix: u8, gateway: Option<IpAddr>, oif: u32) -> Request {
    Request {
        what: format!("add route {dst}/{prefix}"),
        msg: RouteNetlinkMessage::NewRoute(route_msg(dst, prefix, gateway, oif)),
        flags: NLM_F_CREATE | NLM_F_REPLACE,
    }
}

/// Delete the host route to `ip` (a /32 or /128).
pub fn del_host_route(ip: IpAddr) -> Request {
    let mut m = route_msg(ip, full_prefix(&ip), None, 0);
    m.attributes
        .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
    m.header.scope = RouteScope::NoWhere;
    Request {
        what: format!("delete route {ip}"),
        msg: RouteNetlinkMessage::DelRoute(m),
        flags: 0,
    }
}

/// A permanent neighbour entry: `ip` is at `mac` on link `index`. Static
/// entries mean neither side ever has to ARP or solicit for the other.
pub fn add_neigh(index: u32, ip: IpAddr, mac: [u8; 6]) -> Request {
    let mut m = NeighbourMessage::default();
    m.header.family = family(&ip);
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    Request {
        what: format!("add neighbour {ip}"),
        msg: RouteNetlinkMessage::NewNeighbour(m),
        flags: NLM_F_CREATE | NLM_F_REPLACE,
    }
}
