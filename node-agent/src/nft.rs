//! nodeplane's nftables table: rendering and applying the compiled policy.
//!
//! Layout (table `inet nodeplane` by default):
//! - `prerouting` (priority raw, before conntrack): anti-spoofing. A packet
//!   from a pod interface must carry one of that pod's addresses
//!   (`spoof_v4/v6`: interface . address), else it is dropped.
//! - `forward` and `input` send traffic from or to pod interfaces into
//!   `pod_fwd` / `pod_in`: established and related traffic passes first (so
//!   the cost for running connections does not depend on policy at all),
//!   a TCP packet that would open a connection without SYN is dropped (so a
//!   connection whose conntrack entry a policy change removed cannot be
//!   picked up again mid-stream), then one verdict-map lookup per direction
//!   (`egress_v4/v6`: source pod address → its egress group; `ingress_v4/v6`:
//!   destination pod address → its ingress group).
//! - One chain per rule *group* (`i<digest>`, `e<digest>`), holding one
//!   lookup in the group's concatenated interval map (`<group>_v4/_v6`:
//!   peer address . protocol . port → the policy's counter): allowed
//!   traffic is counted against its policy and returns, the rest is dropped.
//!   Per-packet cost is two hash lookups and two interval lookups however
//!   many pods, policies or rules there are.
//! - The output hook is not filtered: the node always reaches its pods
//!   (kubelet probes).
//!
//! Groups are named after what shapes them (see [`crate::compiler`]), not
//! after their contents, so a change usually edits a few elements of the
//! groups it touches; it may also need new groups, repoint verdict-map
//! elements and retire groups nothing points to. A new group goes into a
//! spare chain kept ready (see [`Slots`]) and a retired one keeps its
//! elements until the clean-up after the change empties it into a spare,
//! so a change is element adds and deletes only, sent as one nf_tables
//! netlink transaction ([`crate::nftnl`]), which the kernel applies
//! atomically; `nft -f` is needed only for structure (new policy counters,
//! topping up spares afterwards). At start the agent reads back
//! which objects its table holds and rewrites them (flush and refill) in
//! one `nft -f` transaction, so traffic of running pods never sees a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use crate::cells::Cell;
use crate::policy::{Compiled, Dir, Group};
use crate::{Error, Result};

mod script;
pub use script::{Elem, Field, Script, Step, Value};

/// What happens to a pod whose address the agent has not programmed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Dropped both ways until the agent programs it (default).
    Isolate,
    /// Passes unchecked (no policy, no anti-spoofing) until programmed.
    Open,
}

/// Static settings of the table.
#[derive(Debug, Clone)]
pub struct Settings {
    pub table: String,
    /// Host-side interface name prefix of pod veths (the plugin's
    /// `hostInterfacePrefix`).
    pub iface_prefix: String,
    pub fail_mode: FailMode,
    /// The node's pod CIDRs: addresses in them that are not programmed
    /// pods get the fail mode.
    pub pod_cidrs: Vec<ipnetwork::IpNetwork>,
    /// The app runtime's TCP address: pods always reach it, whatever
    /// egress policy selects them (as a sidecar on localhost would be).
    pub runtime: Option<std::net::SocketAddr>,
}

/// Names of the objects a table holds (read back from the kernel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub present: bool,
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    pub maps: BTreeSet<String>,
    pub counters: BTreeSet<String>,
}

/// Empty group chains (with their maps and rules) kept ready per
/// direction, so a change that needs a new group only fills one in with
/// elements, over netlink, instead of creating structure with `nft -f`
/// (a process spawn and a parse of the table's cache: 10–40 ms here).
pub const SPARE_GROUPS: usize = 8;

/// Which chain holds each group, and the spare chains.
///
/// A full sync puts every group in a chain named after it and makes
/// (by default [`SPARE_GROUPS`]) empty chains per direction (`si<n>`, `se<n>`). A
/// [`delta`] puts a new group into a spare chain of its direction, all in
/// the one element transaction. A removed group's chain is only retired
/// there: nothing jumps to it any more, but its elements stay until
/// [`replenish`] deletes them, off the path of the change, and makes the
/// chain a spare again. (Emptying a large group in the change's own
/// transaction was most of its cost: a pod whose labels move it to another
/// group took 2,717 element deletes with it.)
#[derive(Debug, Clone)]
pub struct Slots {
    chain: std::collections::HashMap<String, String>,
    spare: [Vec<String>; 2],
    /// Chains nothing jumps to that still hold elements: the direction's
    /// index and the deletes that empty them.
    retired: Vec<(String, usize, Script)>,
    /// Counters no policy uses any more, deleted once the retired
    /// chains' elements (which name them) are gone.
    counters_gone: BTreeSet<String>,
    made: u64,
    /// Spares to keep per direction.
    want: usize,
}

impl Default for Slots {
    fn default() -> Self {
        Slots::new(SPARE_GROUPS)
    }
}

impl Slots {
    /// Slots keeping `want` spare chains per direction (0: every new group
    /// is created with `nft -f` when it is needed).
    pub fn new(want: usize) -> Slots {
        Slots {
            chain: Default::default(),
            spare: Default::default(),
            retired: Vec::new(),
            counters_gone: BTreeSet::new(),
            made: 0,
            want,
        }
    }

    /// The chain that holds group `id`.
    pub fn chain<'a>(&'a self, id: &'a str) -> &'a str {
        self.chain.get(id).map_or(id, String::as_str)
    }

    /// Spare chains ready for ingress and egress groups.
    pub fn spares(&self) -> (usize, usize) {
        (self.spare[0].len(), self.spare[1].len())
    }

    /// Whether `chain` is a spare (empty, nothing jumps to it).
    pub fn is_spare(&self, chain: &str) -> bool {
        self.spare.iter().flatten().any(|c| c == chain)
    }

    /// Whether `chain` is retired: nothing jumps to it, but [`replenish`]
    /// has not emptied it yet.
    pub fn is_retired(&self, chain: &str) -> bool {
        self.retired.iter().any(|(c, _, _)| c == chain)
    }

    /// How many chains wait for [`replenish`] to empty them.
    pub fn chains_retired(&self) -> usize {
        self.retired.len()
    }

    fn new_spare(&mut self, dir: Dir) -> String {
        let name = format!("s{}{}", dir_tag(dir), self.made);
        self.made += 1;
        name
    }
}

fn dir_tag(dir: Dir) -> &'static str {
    match dir {
        Dir::Ingress => "i",
        Dir::Egress => "e",
    }
}

fn dir_index(dir: Dir) -> usize {
    match dir {
        Dir::Ingress => 0,
        Dir::Egress => 1,
    }
}

/// Static sets, maps and counters of the base table.
const BASE_SETS: &[(&str, &str)] = &[
    ("podnets_v4", "type ipv4_addr; flags interval;"),
    ("podnets_v6", "type ipv6_addr; flags interval;"),
    ("pods_v4", "type ipv4_addr;"),
    ("pods_v6", "type ipv6_addr;"),
    ("pod_ifaces", "type ifname;"),
    ("spoof_v4", "type ifname . ipv4_addr;"),
    ("spoof_v6", "type ifname . ipv6_addr;"),
];
const BASE_MAPS: &[(&str, &str)] = &[
    ("ingress_v4", "type ipv4_addr : verdict;"),
    ("ingress_v6", "type ipv6_addr : verdict;"),
    ("egress_v4", "type ipv4_addr : verdict;"),
    ("egress_v6", "type ipv6_addr : verdict;"),
];
/// Drop counters, exported as metrics.
pub const DROP_COUNTERS: &[&str] = &["spoofed", "unprogrammed", "denied_ingress", "denied_egress"];
const BASE_CHAINS: &[&str] = &["prerouting", "forward", "input", "pod_fwd", "pod_in"];

/// Every element of the base sets and maps, derived from a compile.
#[derive(Debug, Default, PartialEq, Eq)]
struct BaseElements(BTreeMap<&'static str, BTreeSet<Elem>>);

fn ip_field(ip: &std::net::IpAddr) -> Field {
    match ip {
        std::net::IpAddr::V4(a) => Field::V4(*a),
        std::net::IpAddr::V6(a) => Field::V6(*a),
    }
}

impl BaseElements {
    fn of(c: &Compiled, s: &Settings, slots: &Slots) -> Self {
        let mut m: BTreeMap<&'static str, BTreeSet<Elem>> = BTreeMap::new();
        for n in s.pod_cidrs.iter() {
            let set = if n.is_ipv4() {
                "podnets_v4"
            } else {
                "podnets_v6"
            };
            m.entry(set)
                .or_default()
                .insert(Elem::set(vec![Field::Text(n.to_string())]));
        }
        for p in &c.pods {
            let iface = Field::Iface(p.host_ifname.clone());
            m.entry("pod_ifaces")
                .or_default()
                .insert(Elem::set(vec![iface.clone()]));
            for ip in &p.ips {
                let v = if ip.is_ipv4() { "v4" } else { "v6" };
                let pick = |a: &'static str, b: &'static str| if v == "v4" { a } else { b };
                m.entry(pick("pods_v4", "pods_v6"))
                    .or_default()
                    .insert(Elem::set(vec![ip_field(ip)]));
                m.entry(pick("spoof_v4", "spoof_v6"))
                    .or_default()
                    .insert(Elem::set(vec![iface.clone(), ip_field(ip)]));
                for (group, map) in [
                    (&p.ingress, pick("ingress_v4", "ingress_v6")),
                    (&p.egress, pick("egress_v4", "egress_v6")),
                ] {
                    if let Some(g) = group {
                        m.entry(map).or_default().insert(Elem {
                            key: vec![ip_field(ip)],
                            end: None,
                            value: Value::Jump(slots.chain(g).to_string()),
                        });
                    }
                }
            }
        }
        BaseElements(m)
    }

    fn get(&self, set: &str) -> impl Iterator<Item = &Elem> {
        self.0.get(set).into_iter().flatten()
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', ""))
}

/// The rules of the base chains.
fn base_rules(s: &Settings) -> Vec<(&'static str, String)> {
    let wild = quote(&format!("{}*", s.iface_prefix));
    let mut r = vec![(
        "prerouting",
        "type filter hook prerouting priority raw; policy accept;".to_string(),
    )];
    // The app runtime takes a pod's source address as its identity: only
    // a pod's own veth (anti-spoofed below) or the node itself may reach
    // it, never a packet from another link claiming a pod's address.
    match s.runtime {
        Some(std::net::SocketAddr::V4(a)) => r.push((
            "prerouting",
            format!(
                "iifname != {wild} iifname != \"lo\" ip daddr {} tcp dport {} drop",
                a.ip(),
                a.port()
            ),
        )),
        Some(std::net::SocketAddr::V6(a)) => r.push((
            "prerouting",
            format!(
                "iifname != {wild} iifname != \"lo\" ip6 daddr {} tcp dport {} drop",
                a.ip(),
                a.port()
            ),
        )),
        None => {}
    }
    r.extend([
        ("prerouting", format!("iifname != {wild} accept")),
        // Link-local and unspecified sources (neighbour discovery, MLD,
        // router solicitations) are never forwarded off the link, so they
        // cannot impersonate another pod.
        ("prerouting", "ip6 saddr { ::, fe80::/10 } accept".into()),
    ]);
    if s.fail_mode == FailMode::Open {
        r.push(("prerouting", "iifname != @pod_ifaces accept".into()));
    }
    r.extend([
        (
            "prerouting",
            "iifname . ip saddr @spoof_v4 accept".to_string(),
        ),
        ("prerouting", "iifname . ip6 saddr @spoof_v6 accept".into()),
        ("prerouting", "counter name \"spoofed\" drop".into()),
        (
            "forward",
            "type filter hook forward priority filter; policy accept;".into(),
        ),
        ("forward", format!("iifname {wild} goto pod_fwd")),
        ("forward", format!("oifname {wild} goto pod_fwd")),
        (
            "input",
            "type filter hook input priority filter; policy accept;".into(),
        ),
        ("input", format!("iifname {wild} goto pod_in")),
        ("pod_fwd", "ct state established,related accept".into()),
        (
            "pod_fwd",
            "ct state new tcp flags & (fin|syn|rst|ack) != syn drop".into(),
        ),
    ]);
    if s.fail_mode == FailMode::Isolate {
        r.push((
            "pod_fwd",
            "ip daddr @podnets_v4 ip daddr != @pods_v4 counter name \"unprogrammed\" drop".into(),
        ));
        r.push((
            "pod_fwd",
            "ip6 daddr @podnets_v6 ip6 daddr != @pods_v6 counter name \"unprogrammed\" drop".into(),
        ));
    }
    r.extend([
        ("pod_fwd", "ip saddr vmap @egress_v4".to_string()),
        ("pod_fwd", "ip6 saddr vmap @egress_v6".into()),
        ("pod_fwd", "ip daddr vmap @ingress_v4".into()),
        ("pod_fwd", "ip6 daddr vmap @ingress_v6".into()),
        ("pod_fwd", "accept".into()),
        ("pod_in", "ct state established,related accept".into()),
        (
            "pod_in",
            "ct state new tcp flags & (fin|syn|rst|ack) != syn drop".into(),
        ),
    ]);
    match s.runtime {
        Some(std::net::SocketAddr::V4(a)) => r.push((
            "pod_in",
            format!("ip daddr {} tcp dport {} accept", a.ip(), a.port()),
        )),
        Some(std::net::SocketAddr::V6(a)) => r.push((
            "pod_in",
            format!("ip6 daddr {} tcp dport {} accept", a.ip(), a.port()),
        )),
        None => {}
    }
    r.extend([
        ("pod_in", "ip saddr vmap @egress_v4".into()),
        ("pod_in", "ip6 saddr vmap @egress_v6".into()),
    ]);
    r
}

fn v4(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}
fn v6(a: u128) -> Ipv6Addr {
    Ipv6Addr::from(a)
}

/// The maps of one group and family, by the shape of the cells they hold.
/// Most cells are one pod address with one protocol and port (or every
/// port, or everything): those go into hash maps, where adding or deleting
/// an element costs the same however large the map. Only address ranges
/// and wide port ranges go into the interval map, whose element deletion in
/// the kernel (pipapo) grows with the square of the map's size: with pod
/// peers in it, one pod's label change cost tens of milliseconds of
/// kernel time over the groups it touched. Cells are disjoint, so a packet
/// matches in at most one of the maps, and the chain tries each in turn:
/// at most four lookups per family, however many rules there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    /// One address, protocol and port: `addr . proto . port`.
    Port,
    /// One address and protocol, every port: `addr . proto`.
    Proto,
    /// One address, every protocol and port: `addr`.
    Addr,
    /// Everything else: interval map `addr . proto . port`.
    Range,
}

/// Port ranges up to this wide on one address are expanded into single
/// ports (hash map elements) instead of an interval element.
const EXPAND_PORTS: u32 = 16;

const SHAPES: [Shape; 4] = [Shape::Port, Shape::Proto, Shape::Addr, Shape::Range];

impl Shape {
    fn of<A: PartialEq>(c: &Cell<A>) -> Shape {
        let one_addr = c.addr.0 == c.addr.1;
        let one_proto = c.proto.0 == c.proto.1;
        let all_ports = c.port == (0, u16::MAX);
        let narrow = u32::from(c.port.1) - u32::from(c.port.0) < EXPAND_PORTS;
        match (one_addr, one_proto) {
            (true, true) if all_ports => Shape::Proto,
            (true, true) if narrow => Shape::Port,
            (true, false) if c.proto == (0, u8::MAX) && all_ports => Shape::Addr,
            _ => Shape::Range,
        }
    }

    /// The map's name for group `id` and family suffix "4"/"6".
    fn map(self, id: &str, fam: &str) -> String {
        let s = match self {
            Shape::Port => "x",
            Shape::Proto => "y",
            Shape::Addr => "z",
            Shape::Range => "v",
        };
        format!("{id}_{s}{fam}")
    }

    fn spec(self, addr_type: &str) -> String {
        match self {
            Shape::Port => {
                format!("type {addr_type} . inet_proto . inet_service : counter;")
            }
            Shape::Proto => format!("type {addr_type} . inet_proto : counter;"),
            Shape::Addr => format!("type {addr_type} : counter;"),
            Shape::Range => {
                format!("type {addr_type} . inet_proto . inet_service : counter; flags interval;")
            }
        }
    }

    /// The packet fields the map is looked up with (after the address).
    fn key_expr(self) -> &'static str {
        match self {
            Shape::Port | Shape::Range => " . meta l4proto . th dport",
            Shape::Proto => " . meta l4proto",
            Shape::Addr => "",
        }
    }
}

/// Every map name a group has (for read-back clean-up).
fn group_maps(id: &str) -> Vec<String> {
    ["4", "6"]
        .iter()
        .flat_map(|fam| SHAPES.iter().map(move |s| s.map(id, fam)))
        .collect()
}

/// A cell's map elements, with the map shape each goes to.
fn cell_entries<A: Copy + PartialEq>(
    c: &Cell<A>,
    policy: &str,
    addr: &impl Fn(A) -> Field,
    out: &mut Vec<(Shape, Elem)>,
) {
    let value = Value::Counter(policy.to_string());
    let shape = Shape::of(c);
    let elem = |key: Vec<Field>, end: Option<Vec<Field>>| Elem {
        key,
        end,
        value: value.clone(),
    };
    let a = addr(c.addr.0);
    match shape {
        Shape::Port => {
            for port in c.port.0..=c.port.1 {
                let key = vec![a.clone(), Field::Proto(c.proto.0), Field::Port(port)];
                out.push((shape, elem(key, None)));
            }
        }
        Shape::Proto => out.push((shape, elem(vec![a, Field::Proto(c.proto.0)], None))),
        Shape::Addr => out.push((shape, elem(vec![a], None))),
        Shape::Range => out.push((
            shape,
            elem(
                vec![a, Field::Proto(c.proto.0), Field::Port(c.port.0)],
                Some(vec![
                    addr(c.addr.1),
                    Field::Proto(c.proto.1),
                    Field::Port(c.port.1),
                ]),
            ),
        )),
    }
}

/// One family's cells of a group, compared by policy name (the index
/// tables of two compiles may differ).
type Named<'a, A> = BTreeSet<(A, A, u8, u8, u16, u16, &'a str)>;

fn named<'a, A: Copy + Ord>(cells: &[Cell<A>], names: &'a [String]) -> Named<'a, A> {
    cells
        .iter()
        .map(|c| {
            (
                c.addr.0,
                c.addr.1,
                c.proto.0,
                c.proto.1,
                c.port.0,
                c.port.1,
                names[c.policy].as_str(),
            )
        })
        .collect()
}

fn unnamed<A: Copy>(e: &(A, A, u8, u8, u16, u16, &str)) -> Cell<A> {
    Cell {
        addr: (e.0, e.1),
        proto: (e.2, e.3),
        port: (e.4, e.5),
        policy: 0,
    }
}

/// Renders one family's element changes: deletes of `gone`, then adds of
/// `added`, map by map (in one transaction the kernel checks each added
/// element against the map as it will be, so an add may reuse a key or
/// overlap an interval deleted just before).
fn family_changes<A: Copy + Ord>(
    out: &mut Script,
    id: &str,
    fam: &str,
    gone: &[(A, A, u8, u8, u16, u16, &str)],
    added: &[(A, A, u8, u8, u16, u16, &str)],
    addr: impl Fn(A) -> Field,
) {
    let entries = |cells: &[(A, A, u8, u8, u16, u16, &str)]| {
        let mut v = Vec::new();
        for e in cells {
            cell_entries(&unnamed(e), e.6, &addr, &mut v);
        }
        v
    };
    let (gone, added) = (entries(gone), entries(added));
    for shape in SHAPES {
        let map = shape.map(id, fam);
        let pick = |list: &[(Shape, Elem)]| -> Vec<Elem> {
            list.iter()
                .filter(|e| e.0 == shape)
                .map(|e| e.1.clone())
                .collect()
        };
        out.delete(&map, pick(&gone));
        out.add(&map, pick(&added));
    }
}

/// Commands that turn group `id`'s map elements from `old` into `new`
/// (same group name, changed contents): only the cells that went, came
/// or changed are touched.
fn update_group(out: &mut Script, id: &str, old: (&Group, &[String]), new: (&Group, &[String])) {
    let (a, b) = (named(&old.0.v4, old.1), named(&new.0.v4, new.1));
    let gone: Vec<_> = a.difference(&b).copied().collect();
    let added: Vec<_> = b.difference(&a).copied().collect();
    family_changes(out, id, "4", &gone, &added, |x| Field::V4(v4(x)));
    let (a, b) = (named(&old.0.v6, old.1), named(&new.0.v6, new.1));
    let gone: Vec<_> = a.difference(&b).copied().collect();
    let added: Vec<_> = b.difference(&a).copied().collect();
    family_changes(out, id, "6", &gone, &added, |x| Field::V6(v6(x)));
}

/// Commands that create group `id` (chain, its maps, their elements).
/// Commands that create group `id`: its maps, chain and rules go to
/// `structure`, the maps' elements to `elements` (the same script for a
/// full rewrite; see [`delta`] for why they can be apart).
fn add_group(
    structure: &mut Script,
    elements: &mut Script,
    id: &str,
    g: &Group,
    policies: &[String],
) {
    let t = structure.table.clone();
    let out = structure;
    let (peer4, peer6, denied) = match g.dir {
        Dir::Ingress => ("ip saddr", "ip6 saddr", "denied_ingress"),
        Dir::Egress => ("ip daddr", "ip6 daddr", "denied_egress"),
    };
    for (fam, addr_type) in [("4", "ipv4_addr"), ("6", "ipv6_addr")] {
        for shape in SHAPES {
            let _ = writeln!(
                out,
                "add map inet {t} {} {{ {} }}",
                shape.map(id, fam),
                shape.spec(addr_type)
            );
        }
    }
    let _ = writeln!(out, "add chain inet {t} {id}");
    let _ = writeln!(out, "flush chain inet {t} {id}");
    for (fam, peer) in [("4", peer4), ("6", peer6)] {
        for shape in SHAPES {
            let _ = writeln!(
                out,
                "add rule inet {t} {id} counter name {peer}{} map @{} return",
                shape.key_expr(),
                shape.map(id, fam)
            );
        }
    }
    let _ = writeln!(out, "add rule inet {t} {id} counter name \"{denied}\" drop");
    fill_group(elements, id, g, policies);
}

/// The elements of group `g` added to the (empty) maps of chain `chain`.
fn fill_group(elements: &mut Script, chain: &str, g: &Group, policies: &[String]) {
    update_group(elements, chain, (&Group::empty(g.dir), &[]), (g, policies));
}

/// The transaction that makes a table holding `existing` equal to `next`.
///
/// Every group goes into a chain named after it, and `slots` is reset to
/// that, with fresh spare chains.
pub fn full(s: &Settings, existing: &Existing, next: &Compiled, slots: &mut Slots) -> String {
    let t = &s.table;
    let mut out = Script::new(t);
    let _ = writeln!(out, "add table inet {t}");
    *slots = Slots::new(slots.want);
    let base = BaseElements::of(next, s, slots);
    for (what, list) in [("set", BASE_SETS), ("map", BASE_MAPS)] {
        for (name, spec) in list {
            let _ = writeln!(out, "add {what} inet {t} {name} {{ {spec} }}");
            let _ = writeln!(out, "flush {what} inet {t} {name}");
        }
    }
    for c in DROP_COUNTERS
        .iter()
        .map(|c| c.to_string())
        .chain(next.counters.keys().cloned())
    {
        let _ = writeln!(out, "add counter inet {t} {c}");
    }
    let rules = base_rules(s);
    for chain in BASE_CHAINS {
        match rules
            .iter()
            .find(|(c, r)| c == chain && r.starts_with("type "))
        {
            Some((_, hook)) => writeln!(out, "add chain inet {t} {chain} {{ {hook} }}"),
            None => writeln!(out, "add chain inet {t} {chain}"),
        }
        .ok();
        let _ = writeln!(out, "flush chain inet {t} {chain}");
    }
    let mut elems = Script::new(t);
    let mut spares = Vec::new();
    for dir in [Dir::Ingress, Dir::Egress] {
        for _ in 0..slots.want {
            let name = slots.new_spare(dir);
            slots.spare[dir_index(dir)].push(name.clone());
            spares.push((name, Group::empty(dir)));
        }
    }
    let groups = next
        .groups
        .iter()
        .map(|(id, g)| (id, &**g, next.policies.as_slice()))
        .chain(spares.iter().map(|(n, g)| (n, g, &[][..])));
    for (name, g, policies) in groups {
        for map in group_maps(name) {
            if existing.maps.contains(&map) {
                let _ = writeln!(out, "flush map inet {t} {map}");
            }
        }
        add_group(&mut out, &mut elems, name, g, policies);
    }
    out.steps.append(&mut elems.steps);
    for (chain, rule) in rules.iter().filter(|(_, r)| !r.starts_with("type ")) {
        let _ = writeln!(out, "add rule inet {t} {chain} {rule}");
    }
    for (name, _) in BASE_SETS.iter().chain(BASE_MAPS) {
        out.add(name, base.get(name).cloned().collect());
    }
    // Whatever else the table holds is stale: groups first (they use the
    // counters), then their maps, then counters.
    let is_spare = |name: &String| spares.iter().any(|(n, _)| n == name);
    for chain in existing.chains.iter() {
        if !BASE_CHAINS.contains(&chain.as_str())
            && !next.groups.contains_key(chain)
            && !is_spare(chain)
        {
            let _ = writeln!(out, "delete chain inet {t} {chain}");
        }
    }
    let keep_sets: BTreeSet<String> = BASE_SETS
        .iter()
        .chain(BASE_MAPS)
        .map(|(n, _)| n.to_string())
        .chain(next.groups.keys().flat_map(|id| group_maps(id)))
        .chain(spares.iter().flat_map(|(n, _)| group_maps(n)))
        .collect();
    for set in existing.sets.difference(&keep_sets) {
        let _ = writeln!(out, "delete set inet {t} {set}");
    }
    for map in existing.maps.difference(&keep_sets) {
        let _ = writeln!(out, "delete map inet {t} {map}");
    }
    for c in existing.counters.iter() {
        if !DROP_COUNTERS.contains(&c.as_str()) && !next.counters.contains_key(c) {
            let _ = writeln!(out, "delete counter inet {t} {c}");
        }
    }
    out.text()
}

/// The transaction that turns the kernel's `prev` (as last applied) into
/// `next`, touching only what differs.
///
/// Its steps come in two runs: structure that only adds objects nothing
/// refers to yet (counters, new groups' maps, chains and rules), then every
/// element change (which is where traffic switches over). [`apply_script`]
/// may therefore apply the runs as two transactions: the first is
/// invisible to traffic, and the second, usually the only one, goes over
/// netlink.
///
/// A new group goes into a spare chain of `slots` when there is one (then
/// the change is elements only, see [`Slots`]). A removed group's chain is
/// retired and the counters no policy uses any more are noted: what
/// deletes them is [`replenish`]'s, after the change is in force. `slots`
/// is updated to the table as it will be once the script is applied; if
/// applying fails, a full sync resets it.
pub fn delta(s: &Settings, prev: &Compiled, next: &Compiled, slots: &mut Slots) -> Script {
    let t = &s.table;
    let mut out = Script::new(t);
    let mut elems = Script::new(t);
    for c in next
        .counters
        .keys()
        .filter(|c| !prev.counters.contains_key(*c))
    {
        // A counter waiting for deletion is still in the kernel; `add`
        // keeps it, and it is no longer to be deleted.
        slots.counters_gone.remove(c);
        let _ = writeln!(out, "add counter inet {t} {c}");
    }
    let before = BaseElements::of(prev, s, slots);
    let freed: Vec<(&String, &Group, String)> = prev
        .groups
        .iter()
        .filter(|(id, _)| !next.groups.contains_key(*id))
        .map(|(id, g)| (id, &**g, slots.chain(id).to_string()))
        .collect();
    for (id, g) in &next.groups {
        match prev.groups.get(id) {
            None => {
                let chain = match slots.spare[dir_index(g.dir)].pop() {
                    Some(chain) => {
                        fill_group(&mut elems, &chain, g, &next.policies);
                        chain
                    }
                    None => {
                        let chain = slots.new_spare(g.dir);
                        add_group(&mut out, &mut elems, &chain, g, &next.policies);
                        chain
                    }
                };
                slots.chain.insert(id.clone(), chain);
            }
            Some(old) if std::sync::Arc::ptr_eq(old, g) => {}
            Some(old) => update_group(
                &mut elems,
                slots.chain(id),
                (old, &prev.policies),
                (g, &next.policies),
            ),
        }
    }
    let after = BaseElements::of(next, s, slots);
    for (name, _) in BASE_SETS.iter().chain(BASE_MAPS) {
        let old: BTreeSet<&Elem> = before.get(name).collect();
        let new: BTreeSet<&Elem> = after.get(name).collect();
        elems.delete(name, old.difference(&new).map(|e| (*e).clone()).collect());
        elems.add(name, new.difference(&old).map(|e| (*e).clone()).collect());
    }
    // Nothing jumps to a removed group's chain any more (the verdict maps
    // changed above, in the same transaction): retire it, for `replenish`
    // to empty once the change is in force.
    for (id, g, chain) in freed {
        let mut empty = Script::new(t);
        update_group(
            &mut empty,
            &chain,
            (g, &prev.policies),
            (&Group::empty(g.dir), &[]),
        );
        slots.chain.remove(id);
        slots.retired.push((chain, dir_index(g.dir), empty));
    }
    out.steps.append(&mut elems.steps);
    slots.counters_gone.extend(
        prev.counters
            .keys()
            .filter(|c| !next.counters.contains_key(*c))
            .cloned(),
    );
    out
}

/// The clean-up after a [`delta`]: it empties the retired chains (they
/// become spares), deletes the counters no policy uses any more, brings
/// the spare chains back to the wanted number per direction (and deletes
/// spares beyond twice that, after many groups went). Returns it with the
/// slots as they will be once it is applied; None when nothing is to do.
/// Nothing jumps to retired or spare chains, so this is invisible to
/// traffic.
pub fn replenish(s: &Settings, slots: &Slots) -> Option<(Script, Slots)> {
    let t = &s.table;
    let mut next = slots.clone();
    let mut out = Script::new(t);
    let mut none = Script::new(t);
    // Structure first, then the retired chains' element deletes, then the
    // counters those elements named: apply_script's three runs.
    let mut emptied = Script::new(t);
    for (chain, dir, mut empty) in std::mem::take(&mut next.retired) {
        emptied.steps.append(&mut empty.steps);
        next.spare[dir].push(chain);
    }
    let mut after = Script::new(t);
    for c in std::mem::take(&mut next.counters_gone) {
        let _ = writeln!(after, "delete counter inet {t} {c}");
    }
    for dir in [Dir::Ingress, Dir::Egress] {
        while next.spare[dir_index(dir)].len() < next.want {
            let name = next.new_spare(dir);
            add_group(&mut out, &mut none, &name, &Group::empty(dir), &[]);
            next.spare[dir_index(dir)].push(name);
        }
        while next.spare[dir_index(dir)].len() > 2 * next.want {
            let Some(name) = next.spare[dir_index(dir)].pop() else {
                break;
            };
            let _ = writeln!(after, "delete chain inet {t} {name}");
            for map in group_maps(&name) {
                let _ = writeln!(after, "delete map inet {t} {map}");
            }
        }
    }
    out.steps.append(&mut emptied.steps);
    out.steps.append(&mut after.steps);
    (!out.is_empty()).then_some((out, next))
}

/// Applies `script` as one atomic transaction: over netlink when it only
/// adds and deletes elements, else (or if netlink refuses it) with `nft -f`.
/// A [`delta`] with structure around its element changes goes as three
/// transactions (structure added, elements, structure removed).
pub fn apply_script(script: &Script) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    if let Some((pre, mid, post)) = script.phases() {
        if !mid.is_empty() && mid.elements_only() {
            let start = std::time::Instant::now();
            if !pre.is_empty() {
                apply(&pre.text())?;
            }
            let pre_done = start.elapsed();
            if let Err(e) = crate::nftnl::apply(&mid) {
                tracing::warn!(error = %e, "netlink element update refused; applying it with nft -f");
                apply(&mid.text())?;
            }
            let mid_done = start.elapsed();
            if !post.is_empty() {
                apply(&post.text())?;
            }
            tracing::debug!(
                pre_ms = pre_done.as_secs_f64() * 1000.0,
                elements = mid.element_count(),
                elements_ms = (mid_done - pre_done).as_secs_f64() * 1000.0,
                post_ms = (start.elapsed() - mid_done).as_secs_f64() * 1000.0,
                "transaction applied, its elements over netlink"
            );
            return Ok(());
        }
    }
    let start = std::time::Instant::now();
    apply(&script.text())?;
    tracing::debug!(
        ms = start.elapsed().as_secs_f64() * 1000.0,
        "transaction applied with nft -f"
    );
    Ok(())
}

/// Runs `nft -f -` with `script`: one atomic transaction.
pub fn apply(script: &str) -> Result<()> {
    if script.trim().is_empty() {
        return Ok(());
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Nft(format!("cannot run nft (Debian package nftables): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| Error::Nft(format!("write to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Nft(format!("wait for nft: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err: String = err.lines().take(12).collect::<Vec<_>>().join("\n");
    Err(Error::Nft(format!(
        "transaction rejected, nothing changed: {err}"
    )))
}

fn list_json(args: &[&str]) -> Result<Option<serde_json::Value>> {
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| Error::Nft(format!("cannot run nft (Debian package nftables): {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(Error::Nft(format!("nft -j {}: {err}", args.join(" "))));
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Nft(format!("nft -j {} printed bad JSON: {e}", args.join(" "))))
}

/// Reads back which chains, sets and counters the table holds.
pub fn read_back(table: &str) -> Result<Existing> {
    // -t: without the elements (megabytes of JSON for a large policy set).
    let Some(v) = list_json(&["-t", "list", "table", "inet", table])? else {
        return Ok(Existing::default());
    };
    let mut ex = Existing {
        present: true,
        ..Existing::default()
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        let name = |k: &str| item[k]["name"].as_str().map(str::to_string);
        if let Some(n) = name("chain") {
            ex.chains.insert(n);
        } else if let Some(n) = name("set") {
            ex.sets.insert(n);
        } else if let Some(n) = name("map") {
            ex.maps.insert(n);
        } else if let Some(n) = name("counter") {
            ex.counters.insert(n);
        }
    }
    Ok(ex)
}

/// Packets and bytes of every named counter in the table.
pub fn counters(table: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    let Some(v) = list_json(&["list", "counters", "table", "inet", table])? else {
        return Ok(out);
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        let c = &item["counter"];
        if let Some(name) = c["name"].as_str() {
            out.insert(
                name.to_string(),
                (
                    c["packets"].as_u64().unwrap_or(0),
                    c["bytes"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    Ok(out)
}

/// Deletes the table (agent uninstall; tests).
pub fn delete_table(table: &str) -> Result<()> {
    apply(&format!(
        "add table inet {table}\ndelete table inet {table}\n"
    ))
}
