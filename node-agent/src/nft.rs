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
//! groups it touches; it may also create groups, repoint verdict-map
//! elements and delete groups nothing points to. Each change is one
//! `nft -f` transaction, which the kernel applies atomically. At start the
//! agent reads back which objects its table holds and rewrites them (flush
//! and refill) in one transaction too, so traffic of running pods never
//! sees a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use crate::cells::Cell;
use crate::policy::{Compiled, Dir, Group};
use crate::{Error, Result};

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
struct BaseElements(BTreeMap<&'static str, BTreeSet<String>>);

impl BaseElements {
    fn of(c: &Compiled, s: &Settings) -> Self {
        let mut m: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
        for n in s.pod_cidrs.iter() {
            let set = if n.is_ipv4() {
                "podnets_v4"
            } else {
                "podnets_v6"
            };
            m.entry(set).or_default().insert(n.to_string());
        }
        for p in &c.pods {
            m.entry("pod_ifaces")
                .or_default()
                .insert(quote(&p.host_ifname));
            for ip in &p.ips {
                let v = if ip.is_ipv4() { "v4" } else { "v6" };
                let pick = |a: &'static str, b: &'static str| if v == "v4" { a } else { b };
                m.entry(pick("pods_v4", "pods_v6"))
                    .or_default()
                    .insert(ip.to_string());
                m.entry(pick("spoof_v4", "spoof_v6"))
                    .or_default()
                    .insert(format!("{} . {ip}", quote(&p.host_ifname)));
                if let Some(g) = &p.ingress {
                    m.entry(pick("ingress_v4", "ingress_v6"))
                        .or_default()
                        .insert(format!("{ip} : jump {g}"));
                }
                if let Some(g) = &p.egress {
                    m.entry(pick("egress_v4", "egress_v6"))
                        .or_default()
                        .insert(format!("{ip} : jump {g}"));
                }
            }
        }
        BaseElements(m)
    }

    fn get(&self, set: &str) -> impl Iterator<Item = &String> {
        self.0.get(set).into_iter().flatten()
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', ""))
}

/// The rules of the base chains.
fn base_rules(s: &Settings) -> Vec<(&'static str, String)> {
    let wild = quote(&format!("{}*", s.iface_prefix));
    let mut r = vec![
        (
            "prerouting",
            "type filter hook prerouting priority raw; policy accept;".to_string(),
        ),
        ("prerouting", format!("iifname != {wild} accept")),
        // Link-local and unspecified sources (neighbour discovery, MLD,
        // router solicitations) are never forwarded off the link, so they
        // cannot impersonate another pod.
        ("prerouting", "ip6 saddr { ::, fe80::/10 } accept".into()),
    ];
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

fn range<T: std::fmt::Display + PartialEq>(lo: T, hi: T) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// The key of a cell's map element: `addr . proto . port` (ranges where wide).
fn cell_key<A: Copy>(c: &Cell<A>, addr: &impl Fn(A) -> String) -> String {
    let a = if addr(c.addr.0) == addr(c.addr.1) {
        addr(c.addr.0)
    } else {
        format!("{}-{}", addr(c.addr.0), addr(c.addr.1))
    };
    format!(
        "{a} . {} . {}",
        range(c.proto.0, c.proto.1),
        range(c.port.0, c.port.1)
    )
}

fn cell_elements<A: Copy>(
    cells: &[Cell<A>],
    policies: &[String],
    addr: impl Fn(A) -> String,
) -> Vec<String> {
    cells
        .iter()
        .map(|c| format!("{} : {}", cell_key(c, &addr), quote(&policies[c.policy])))
        .collect()
}

/// Commands that turn group `id`'s map elements from `old` into `new`
/// (same group name, changed contents): delete the cells that went or
/// changed, add the new ones. In one transaction the kernel checks the
/// added intervals against the map as it will be, so a new cell may
/// overlap a deleted one.
fn update_group(
    out: &mut String,
    t: &str,
    id: &str,
    old: (&Group, &[String]),
    new: (&Group, &[String]),
) {
    fn diff<A: Copy + Ord>(
        out: &mut String,
        t: &str,
        map: &str,
        old: (&[Cell<A>], &[String]),
        new: (&[Cell<A>], &[String]),
        addr: impl Fn(A) -> String,
    ) {
        // Compare by policy name: the index tables of two compiles may differ.
        let named =
            |cells: &[Cell<A>], names: &[String]| -> BTreeSet<(A, A, u8, u8, u16, u16, String)> {
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
                            names[c.policy].clone(),
                        )
                    })
                    .collect()
            };
        let (a, b) = (named(old.0, old.1), named(new.0, new.1));
        let cell = |e: &(A, A, u8, u8, u16, u16, String)| Cell {
            addr: (e.0, e.1),
            proto: (e.2, e.3),
            port: (e.4, e.5),
            policy: 0,
        };
        let gone: Vec<String> = a
            .difference(&b)
            .map(|e| cell_key(&cell(e), &addr))
            .collect();
        let added: Vec<String> = b
            .difference(&a)
            .map(|e| format!("{} : {}", cell_key(&cell(e), &addr), quote(&e.6)))
            .collect();
        delete_elements(out, t, map, &gone);
        elements(out, t, map, &added);
    }
    diff(
        out,
        t,
        &format!("{id}_v4"),
        (&old.0.v4, old.1),
        (&new.0.v4, new.1),
        |a| v4(a).to_string(),
    );
    diff(
        out,
        t,
        &format!("{id}_v6"),
        (&old.0.v6, old.1),
        (&new.0.v6, new.1),
        |a| v6(a).to_string(),
    );
}

/// Commands that create group `id` (chain, two maps, their elements).
fn add_group(out: &mut String, t: &str, id: &str, g: &Group, policies: &[String]) {
    let (peer4, peer6, denied) = match g.dir {
        Dir::Ingress => ("ip saddr", "ip6 saddr", "denied_ingress"),
        Dir::Egress => ("ip daddr", "ip6 daddr", "denied_egress"),
    };
    let _ = writeln!(
        out,
        "add map inet {t} {id}_v4 {{ type ipv4_addr . inet_proto . inet_service : counter; flags interval; }}"
    );
    let _ = writeln!(
        out,
        "add map inet {t} {id}_v6 {{ type ipv6_addr . inet_proto . inet_service : counter; flags interval; }}"
    );
    elements(
        out,
        t,
        &format!("{id}_v4"),
        &cell_elements(&g.v4, policies, |a| v4(a).to_string()),
    );
    elements(
        out,
        t,
        &format!("{id}_v6"),
        &cell_elements(&g.v6, policies, |a| v6(a).to_string()),
    );
    let _ = writeln!(out, "add chain inet {t} {id}");
    let _ = writeln!(out, "flush chain inet {t} {id}");
    let _ = writeln!(
        out,
        "add rule inet {t} {id} counter name {peer4} . meta l4proto . th dport map @{id}_v4 return"
    );
    let _ = writeln!(
        out,
        "add rule inet {t} {id} counter name {peer6} . meta l4proto . th dport map @{id}_v6 return"
    );
    let _ = writeln!(out, "add rule inet {t} {id} counter name \"{denied}\" drop");
}

fn elements(out: &mut String, t: &str, set: &str, elems: &[String]) {
    for chunk in elems.chunks(2000) {
        let _ = writeln!(out, "add element inet {t} {set} {{ {} }}", chunk.join(", "));
    }
}

fn delete_elements(out: &mut String, t: &str, set: &str, elems: &[String]) {
    for chunk in elems.chunks(2000) {
        let _ = writeln!(
            out,
            "delete element inet {t} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}

/// Keys of verdict-map elements ("addr : jump g" → "addr").
fn element_key(e: &str) -> &str {
    e.split(" : ").next().unwrap_or(e)
}

/// The transaction that makes a table holding `existing` equal to `next`.
pub fn full(s: &Settings, existing: &Existing, next: &Compiled) -> String {
    let t = &s.table;
    let mut out = String::new();
    let _ = writeln!(out, "add table inet {t}");
    let base = BaseElements::of(next, s);
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
    for (id, g) in &next.groups {
        if existing.maps.contains(&format!("{id}_v4")) {
            let _ = writeln!(out, "flush map inet {t} {id}_v4");
            let _ = writeln!(out, "flush map inet {t} {id}_v6");
        }
        add_group(&mut out, t, id, g, &next.policies);
    }
    for (chain, rule) in rules.iter().filter(|(_, r)| !r.starts_with("type ")) {
        let _ = writeln!(out, "add rule inet {t} {chain} {rule}");
    }
    for (name, _) in BASE_SETS.iter().chain(BASE_MAPS) {
        let e: Vec<String> = base.get(name).cloned().collect();
        elements(&mut out, t, name, &e);
    }
    // Whatever else the table holds is stale: groups first (they use the
    // counters), then their maps, then counters.
    for chain in existing.chains.iter() {
        if !BASE_CHAINS.contains(&chain.as_str()) && !next.groups.contains_key(chain) {
            let _ = writeln!(out, "delete chain inet {t} {chain}");
        }
    }
    let keep_sets: BTreeSet<String> = BASE_SETS
        .iter()
        .chain(BASE_MAPS)
        .map(|(n, _)| n.to_string())
        .chain(
            next.groups
                .keys()
                .flat_map(|id| [format!("{id}_v4"), format!("{id}_v6")]),
        )
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
    out
}

/// The transaction that turns the kernel's `prev` (as last applied) into
/// `next`, touching only what differs.
pub fn delta(s: &Settings, prev: &Compiled, next: &Compiled) -> String {
    let t = &s.table;
    let mut out = String::new();
    for c in next
        .counters
        .keys()
        .filter(|c| !prev.counters.contains_key(*c))
    {
        let _ = writeln!(out, "add counter inet {t} {c}");
    }
    for (id, g) in &next.groups {
        match prev.groups.get(id) {
            None => add_group(&mut out, t, id, g, &next.policies),
            Some(old) if std::sync::Arc::ptr_eq(old, g) => {}
            Some(old) => update_group(&mut out, t, id, (old, &prev.policies), (g, &next.policies)),
        }
    }
    let (a, b) = (BaseElements::of(prev, s), BaseElements::of(next, s));
    for (name, _) in BASE_SETS.iter().chain(BASE_MAPS) {
        let old: BTreeSet<&String> = a.get(name).collect();
        let new: BTreeSet<&String> = b.get(name).collect();
        let gone: Vec<String> = old
            .difference(&new)
            .map(|e| element_key(e).to_string())
            .collect();
        let added: Vec<String> = new.difference(&old).map(|e| e.to_string()).collect();
        delete_elements(&mut out, t, name, &gone);
        elements(&mut out, t, name, &added);
    }
    for id in prev
        .groups
        .keys()
        .filter(|id| !next.groups.contains_key(*id))
    {
        let _ = writeln!(out, "delete chain inet {t} {id}");
        let _ = writeln!(out, "delete map inet {t} {id}_v4");
        let _ = writeln!(out, "delete map inet {t} {id}_v6");
    }
    for c in prev
        .counters
        .keys()
        .filter(|c| !next.counters.contains_key(*c))
    {
        let _ = writeln!(out, "delete counter inet {t} {c}");
    }
    out
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
    let Some(v) = list_json(&["list", "table", "inet", table])? else {
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
