//! Routed (L3) pod wiring: one veth per pod, no bridge.
//!
//! Host side: an unnumbered veth (`np` + 12 hex digits), a /32 (/128) route to
//! each pod address through it, and a permanent neighbour entry for the pod.
//! Pod side: the addresses as /32 (/128), a default route per family via a
//! link-local gateway (169.254.1.1, fe80::1), and a permanent neighbour entry
//! mapping that gateway to the host veth's MAC. Static neighbours on both
//! sides mean no ARP/NDP exchange is ever needed, so the first packet flows at
//! once and nothing depends on proxy-ARP sysctls.
//!
//! Every host veth carries an alias `nodeplane:<network>:<containerID>:<ifname>`
//! so GC can recognise its own leftovers and never touches anyone else's links.

use std::fs::File;
use std::io;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::config::NetConf;
use crate::error::{Error, Result};
use crate::netlink::{self, Link, Netlink, Rtnl, ROUTE_PROTOCOL};
use crate::result::{CniResult, Interface, IpConfig, Route};

/// Every host-side veth has this MAC: the pod only ever talks to its gateway,
/// so the host end needs no unique L2 identity (Calico does the same).
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// The deterministic host-side name of an attachment: stable across retries,
/// so DEL and GC find the link even without the IPAM record.
pub fn host_ifname(prefix: &str, network: &str, container_id: &str, ifname: &str) -> String {
    format!(
        "{prefix}{:012x}",
        fnv1a(&[network, container_id, ifname]) & 0xffff_ffff_ffff
    )
}

/// The link alias that marks a host veth as ours.
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("nodeplane:{network}:{container_id}:{ifname}")
}

/// Parses an alias back into (network, container ID, ifname).
pub fn parse_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix("nodeplane:")?;
    let (network, rest) = rest.split_once(':')?;
    let (cid, ifname) = rest.split_once(':')?;
    Some((network, cid, ifname))
}

/// A locally administered, unicast MAC derived from the attachment, so the pod
/// keeps one MAC across re-wiring and CHECK can predict it.
pub fn pod_mac(network: &str, container_id: &str, ifname: &str) -> [u8; 6] {
    let h = fnv1a(&[network, container_id, ifname, "mac"]).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn full_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// What one attachment looks like once wired.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub conf: &'a NetConf,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns_path: &'a str,
    pub host_if: String,
    pub ips: &'a [IpAddr],
}

impl Plan<'_> {
    pub fn pod_mac(&self) -> [u8; 6] {
        pod_mac(&self.conf.name, self.container_id, self.ifname)
    }

    /// The CNI result describing this attachment.
    pub fn result(&self) -> CniResult {
        let mut routes = Vec::new();
        let ips = self
            .ips
            .iter()
            .map(|ip| {
                let gw = self.conf.gateway_for(ip);
                routes.push(Route {
                    dst: if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.into(),
                    gw: Some(gw.to_string()),
                    ..Default::default()
                });
                IpConfig {
                    version: None,
                    address: format!("{ip}/{}", full_prefix(ip)),
                    gateway: Some(gw.to_string()),
                    interface: Some(1),
                }
            })
            .collect();
        CniResult {
            interfaces: vec![
                Interface {
                    name: self.host_if.clone(),
                    mac: Some(mac_string(&HOST_MAC)),
                    mtu: Some(self.conf.mtu),
                    ..Default::default()
                },
                Interface {
                    name: self.ifname.to_string(),
                    mac: Some(mac_string(&self.pod_mac())),
                    mtu: Some(self.conf.mtu),
                    sandbox: Some(self.netns_path.to_string()),
                    ..Default::default()
                },
            ],
            ips,
            routes,
            dns: serde_json::Value::Null,
        }
    }
}

fn nl(op: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |e| Error::netlink(op, e)
}

/// A netlink socket in the host (current) namespace.
pub fn host_socket() -> Result<Rtnl> {
    Rtnl::new().map_err(nl("open netlink socket"))
}

/// Netlink sockets in the host namespace and in the pod's.
pub fn sockets(netns_path: &str, pod_ns: &File) -> Result<(Rtnl, Rtnl)> {
    let host = host_socket()?;
    let pod = Rtnl::in_netns(pod_ns).map_err(|e| Error::Netns {
        path: netns_path.into(),
        source: e,
    })?;
    Ok((host, pod))
}

/// Creates the veth pair and programs both sides; returns the host veth's
/// index. On failure the caller rolls back with [`unwire`]; nothing here is
/// left half-done on purpose.
pub fn wire(
    plan: &Plan<'_>,
    host: &mut dyn Netlink,
    pod: &mut dyn Netlink,
    pod_ns: &File,
) -> Result<u32> {
    let conf = plan.conf;

    // The alias is set in the second host batch, never with the creation:
    // a batched alias would also land on a same-named link that already
    // exists, and make someone else's link look like ours.
    let create = || {
        vec![netlink::new_veth(
            &plan.host_if,
            HOST_MAC,
            plan.ifname,
            plan.pod_mac(),
            pod_ns,
            conf.mtu,
        )]
    };
    if let Err(e) = host.batch(create()) {
        if e.errno() != Some(libc::EEXIST) {
            return Err(e.into());
        }
        // Either the pod already has an interface of that name (the spec
        // says ADD must fail), or a crashed earlier ADD left our host end.
        if pod
            .link(plan.ifname)
            .map_err(nl("look up pod interface"))?
            .is_some()
        {
            return Err(Error::AlreadyAttached {
                container_id: plan.container_id.into(),
                ifname: plan.ifname.into(),
                network: conf.name.clone(),
                detail: format!(
                    "interface {} already exists in {}",
                    plan.ifname, plan.netns_path
                ),
            });
        }
        // Only ever remove a leftover that is provably this attachment's: a
        // host name shared with another attachment (a 48-bit hash collision)
        // must fail loudly rather than cut another pod off.
        let mine = alias(&conf.name, plan.container_id, plan.ifname);
        let leftover = host
            .link(&plan.host_if)
            .map_err(nl("look up host interface"))?;
        if let Some(l) = leftover.as_ref().filter(|l| !owns(l, &mine)) {
            return Err(Error::AlreadyAttached {
                container_id: plan.container_id.into(),
                ifname: plan.ifname.into(),
                network: conf.name.clone(),
                detail: format!(
                    "host interface {} exists but belongs to {:?}; set another hostInterfacePrefix",
                    l.name, l.alias
                ),
            });
        }
        if let Some(l) = leftover {
            delete_index(host, l.index)?;
        }
        host.batch(create())?;
    }

    let pod_link = pod
        .link(plan.ifname)
        .map_err(nl("look up pod interface"))?
        .ok_or_else(|| Error::netlink("look up pod interface", io::ErrorKind::NotFound.into()))?;
    let host_link = host
        .link(&plan.host_if)
        .map_err(nl("look up host interface"))?
        .ok_or_else(|| Error::netlink("look up host interface", io::ErrorKind::NotFound.into()))?;

    let mut pod_reqs = vec![netlink::set_up(pod_link.index)];
    let mut host_reqs = vec![netlink::set_alias(
        &plan.host_if,
        &alias(&conf.name, plan.container_id, plan.ifname),
    )];
    for ip in plan.ips {
        let gw = conf.gateway_for(ip);
        pod_reqs.push(netlink::add_addr(pod_link.index, *ip, full_prefix(ip)));
        if ip.is_ipv4() {
            // IPv4 needs an on-link route to the gateway before it can be a next hop.
            pod_reqs.push(netlink::add_route(gw, 32, None, pod_link.index));
        }
        pod_reqs.push(netlink::add_neigh(pod_link.index, gw, HOST_MAC));
        // Prefix 0: the default route of the gateway's family.
        pod_reqs.push(netlink::add_route(gw, 0, Some(gw), pod_link.index));
        host_reqs.push(netlink::add_route(
            *ip,
            full_prefix(ip),
            None,
            host_link.index,
        ));
        host_reqs.push(netlink::add_neigh(host_link.index, *ip, plan.pod_mac()));
    }
    pod.batch(pod_reqs)?;
    host.batch(host_reqs)?;
    enable_forwarding(plan.ips)?;
    wait_oper_up(host, &plan.host_if)?;
    wait_oper_up(pod, plan.ifname)?;
    wait_addrs_live(pod, plan.ips)?;
    Ok(host_link.index)
}

/// Waits until `name` is operationally up. Bringing a veth up only schedules
/// the kernel's link watcher; until it has run, the device still has the
/// "noop" qdisc and drops every packet sent. Returning from ADD before that
/// would let a fast pod's first packets vanish, so ADD waits (typically a
/// few tens of microseconds).
fn wait_oper_up(rt: &mut dyn Netlink, name: &str) -> Result<()> {
    let up = settle(|| {
        let link = rt.link(name).map_err(nl("look up link state"))?;
        Ok(link.as_ref().is_some_and(|l| l.oper_up))
    })?;
    if up {
        return Ok(());
    }
    Err(timed_out(
        format!("wait for {name} to come up"),
        "not operationally up (carrier missing?)",
    ))
}

/// Waits until the pod accepts packets for each of its addresses. An IPv6
/// address, even one added without duplicate address detection, only gets
/// its local route when the kernel's address worker has run; until then a
/// packet to it is dropped as an address error (seen under CPU load: the
/// first ping to a just-added IPv6 pod was lost). IPv4 local routes are
/// installed as the address is added, so an IPv4-only pod costs nothing here.
fn wait_addrs_live(pod: &mut dyn Netlink, ips: &[IpAddr]) -> Result<()> {
    let v6: Vec<&IpAddr> = ips.iter().filter(|ip| ip.is_ipv6()).collect();
    if v6.is_empty() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let live = settle(|| {
        let local = pod.local_ips().map_err(nl("list the pod's local routes"))?;
        missing = v6
            .iter()
            .copied()
            .filter(|ip| !local.contains(ip))
            .collect();
        Ok(missing.is_empty())
    })?;
    if live {
        return Ok(());
    }
    Err(timed_out(
        format!("wait for the pod's addresses {missing:?}"),
        "the kernel has not installed their local routes",
    ))
}

/// How long ADD waits for the kernel to bring an interface or an address
/// into service.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Polls `done` with a short, growing pause until it holds (`true`) or
/// [`SETTLE_TIMEOUT`] passes (`false`).
fn settle(mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        if done()? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(5));
    }
}

fn timed_out(what: String, why: &str) -> Error {
    Error::netlink(
        what,
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{why} after {SETTLE_TIMEOUT:?}"),
        ),
    )
}

/// Turns on forwarding in the host namespace for the families in use (the
/// host routes between pods); written only when off, so it is one read normally.
fn enable_forwarding(ips: &[IpAddr]) -> Result<()> {
    let mut keys = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        keys.push("/proc/sys/net/ipv4/ip_forward");
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        keys.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for key in keys {
        let on = std::fs::read(key)
            .map(|v| v.first() == Some(&b'1'))
            .unwrap_or(false);
        if !on {
            std::fs::write(key, b"1").map_err(|e| Error::Sysctl {
                key: key.into(),
                source: e,
            })?;
        }
    }
    Ok(())
}

/// Whether `link` is the host end this attachment (`alias`) made: our alias,
/// or no alias yet but our MAC (killed between the creation and the alias,
/// which is set in the next batch). Anything else is never touched.
fn owns(link: &Link, alias: &str) -> bool {
    match link.alias.as_deref() {
        Some(a) => a == alias,
        None => link.mac == HOST_MAC,
    }
}

/// The host end of this attachment, if it exists and is ours.
fn own_link(host: &mut dyn Netlink, host_if: &str, alias: &str) -> Result<Option<Link>> {
    Ok(host
        .link(host_if)
        .map_err(nl("look up host interface"))?
        .filter(|l| owns(l, alias)))
}

/// Removes the host veth (which takes the pod end, its routes and neighbour
/// entries with it) and waits for the kernel to finish; returns the index it
/// had. Succeeds when it is already gone; leaves a same-named link that is
/// not ours alone.
pub fn unwire(host_if: &str, alias: &str) -> Result<Option<u32>> {
    let mut host = host_socket()?;
    match own_link(&mut host, host_if, alias)? {
        Some(l) => delete_index(&mut host, l.index).map(|()| Some(l.index)),
        None => Ok(None),
    }
}

/// DEL's fast path. Deleting a veth blocks the caller for an RCU grace period
/// (tens of milliseconds) while the kernel tears the device down, yet nothing
/// the runtime waits for depends on that. So the pod is cut off first, at
/// once, by removing its host routes; then a detached child process deletes
/// the veth while this process returns. The child holds no lock and none of
/// the runtime's pipes, so neither the runtime nor a concurrent call waits
/// for it; if it dies, the next DEL or GC finds the veth by name or alias.
/// It deletes by ifindex, never by name, so a new pod that reuses the name
/// (an ADD retried right after this DEL) cannot lose its fresh veth to it.
/// Returns the veth's index, or `None` if it was already gone.
pub fn unwire_detached(host_if: &str, alias: &str, ips: &[IpAddr]) -> Result<Option<u32>> {
    let mut host = host_socket()?;
    let Some(link) = own_link(&mut host, host_if, alias)? else {
        return Ok(None);
    };
    let routes: Vec<_> = ips.iter().map(|ip| netlink::del_host_route(*ip)).collect();
    if let Err(e) = host.batch(routes) {
        if e.errno() != Some(libc::ESRCH) {
            return Err(e.into());
        }
    }
    drop(host);
    // SAFETY: the plugin is single-threaded, so fork cannot clone a lock held
    // by another thread; the child only makes syscalls and then _exits.
    match unsafe { libc::fork() } {
        0 => {
            detach_from_caller();
            let ok = Rtnl::new()
                .ok()
                .map(|mut rt| delete_index(&mut rt, link.index).is_ok());
            // SAFETY: _exit skips destructors and atexit handlers of the parent's state.
            unsafe { libc::_exit(if ok == Some(true) { 0 } else { 1 }) }
        }
        -1 => {
            // Cannot fork: do it inline.
            let mut host = host_socket()?;
            delete_index(&mut host, link.index).map(|()| Some(link.index))
        }
        _ => Ok(Some(link.index)),
    }
}

/// Deletes a link by index, treating "no such device" as done.
fn delete_index(rt: &mut dyn Netlink, index: u32) -> Result<()> {
    match rt.request(netlink::del_link_index(index)) {
        Err(e) if e.errno() != Some(libc::ENODEV) => Err(e.into()),
        _ => Ok(()),
    }
}

/// In the detached child: leave the caller's session and close the pipes the
/// runtime reads, so the runtime sees EOF as soon as the parent exits.
fn detach_from_caller() {
    // SAFETY: plain syscalls on our own descriptors.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        // Close everything else we might have inherited (e.g. a lock file).
        for fd in 3..64 {
            if fd != null {
                libc::close(fd);
            }
        }
    }
}

/// CHECK: compares the kernel with what ADD made; returns every drift found.
pub fn verify(
    plan: &Plan<'_>,
    host: &mut dyn Netlink,
    pod: &mut dyn Netlink,
    expected_mac: Option<&str>,
) -> Result<Vec<String>> {
    let mut drift = Vec::new();

    let pod_link = pod.link(plan.ifname).map_err(nl("look up pod interface"))?;
    let host_link = host
        .link(&plan.host_if)
        .map_err(nl("look up host interface"))?;
    match &pod_link {
        None => drift.push(format!(
            "interface {} is missing from {}",
            plan.ifname, plan.netns_path
        )),
        Some(l) => check_link(&mut drift, l, "pod interface", plan.conf.mtu, expected_mac),
    }
    match &host_link {
        None => drift.push(format!("host interface {} is missing", plan.host_if)),
        Some(l) => check_link(&mut drift, l, "host interface", plan.conf.mtu, None),
    }
    if let (Some(p), Some(h)) = (&pod_link, &host_link) {
        let addrs = pod.addrs().map_err(nl("list pod addresses"))?;
        let pod_routes = pod.routes().map_err(nl("list pod routes"))?;
        let host_routes = host.routes().map_err(nl("list host routes"))?;
        for ip in plan.ips {
            if !addrs.iter().any(|a| a.index == p.index && a.ip == *ip) {
                drift.push(format!("address {ip} is missing from {}", plan.ifname));
            }
            let gw = plan.conf.gateway_for(ip);
            let has_default = pod_routes.iter().any(|r| {
                r.prefix == 0
                    && r.dst.is_ipv4() == ip.is_ipv4()
                    && r.gateway == Some(gw)
                    && r.oif == Some(p.index)
            });
            if !has_default {
                drift.push(format!(
                    "pod default route via {gw} dev {} is missing",
                    plan.ifname
                ));
            }
            let has_host_route = host_routes
                .iter()
                .any(|r| r.dst == *ip && r.prefix == full_prefix(ip) && r.oif == Some(h.index));
            if !has_host_route {
                drift.push(format!(
                    "host route {ip}/{} dev {} is missing",
                    full_prefix(ip),
                    plan.host_if
                ));
            }
        }
    }
    Ok(drift)
}

fn check_link(drift: &mut Vec<String>, l: &Link, what: &str, mtu: u32, mac: Option<&str>) {
    if !l.up {
        drift.push(format!("{what} {} is down", l.name));
    }
    if l.mtu != mtu {
        drift.push(format!(
            "{what} {} has MTU {} instead of {mtu}",
            l.name, l.mtu
        ));
    }
    if let Some(m) = mac {
        if !mac_string(&l.mac).eq_ignore_ascii_case(m) {
            drift.push(format!(
                "{what} {} has MAC {} instead of {m}",
                l.name,
                mac_string(&l.mac)
            ));
        }
    }
}

/// GC: deletes host veths of `network` whose attachment is not in `keep`, and
/// host routes we installed into `cidrs` for addresses nothing holds any more.
pub fn sweep(
    host: &mut dyn Netlink,
    network: &str,
    keep: &dyn Fn(&str, &str) -> bool,
    live_ips: &[IpAddr],
    cidrs: &[IpNetwork],
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for link in host.links().map_err(nl("list links"))? {
        let Some(alias) = link.alias.as_deref() else {
            continue;
        };
        match parse_alias(alias) {
            Some((net, cid, ifname)) if net == network && !keep(cid, ifname) => {
                delete_index(host, link.index)?;
                removed.push(link.name);
            }
            _ => {}
        }
    }
    for r in host.routes().map_err(nl("list routes"))? {
        let ours = r.protocol == ROUTE_PROTOCOL
            && r.prefix == full_prefix(&r.dst)
            && cidrs.iter().any(|c| c.contains(r.dst));
        if ours && !live_ips.contains(&r.dst) {
            match host.request(netlink::del_host_route(r.dst)) {
                Err(e) if e.errno() != Some(libc::ESRCH) => return Err(e.into()),
                _ => {}
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::fake::Fake;

    fn conf() -> NetConf {
        NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"net","type":"nodeplane-cni",
                "podCIDRs":["10.244.0.0/24","fd00::/64"],"stateDir":"/tmp/unused"}"#,
        )
        .expect("valid config")
    }

    fn plan<'a>(conf: &'a NetConf, ips: &'a [IpAddr]) -> Plan<'a> {
        Plan {
            conf,
            container_id: "c1",
            ifname: "eth0",
            netns_path: "/run/netns/p",
            host_if: host_ifname("np", "net", "c1", "eth0"),
            ips,
        }
    }

    fn ips() -> Vec<IpAddr> {
        vec![
            "10.244.0.7".parse().expect("ip"),
            "fd00::7".parse().expect("ip"),
        ]
    }

    /// Host and pod fakes as they look right after a successful creation.
    fn created(p: &Plan<'_>) -> (Fake, Fake) {
        let host = Fake::default().with_link(&p.host_if, 5, HOST_MAC, None);
        let pod = Fake::default().with_link("eth0", 2, [2, 0, 0, 0, 0, 1], None);
        (host, pod)
    }

    fn null() -> File {
        File::open("/dev/null").expect("/dev/null")
    }

    #[test]
    fn wires_both_sides_in_order() {
        let (c, ips) = (conf(), ips());
        let p = plan(&c, &ips);
        let (mut host, mut pod) = created(&p);
        wire(&p, &mut host, &mut pod, &null()).expect("wire");
        assert!(host.log[0].starts_with("create veth"), "{:?}", host.log);
        assert!(
            host.log[1].starts_with("set alias"),
            "alias comes after creation: {:?}",
            host.log
        );
        assert!(
            host.sent("add route 10.244.0.7/32") && host.sent("add route fd00::7/128"),
            "{:?}",
            host.log
        );
        assert!(host.sent("add neighbour 10.244.0.7"), "{:?}", host.log);
        assert_eq!(pod.log[0], "set link 2 up");
        assert!(
            pod.sent("add address 10.244.0.7/32") && pod.sent("add address fd00::7/128"),
            "{:?}",
            pod.log
        );
        assert!(
            pod.sent("add route 169.254.1.1/32"),
            "on-link route to the IPv4 gateway: {:?}",
            pod.log
        );
        assert!(
            pod.sent("add neighbour 169.254.1.1") && pod.sent("add neighbour fe80::1"),
            "{:?}",
            pod.log
        );
        assert!(
            pod.sent("add route 169.254.1.1/0") && pod.sent("add route fe80::1/0"),
            "defaults: {:?}",
            pod.log
        );
    }

    #[test]
    fn add_fails_naming_an_address_the_kernel_never_made_live() {
        let (c, ips) = (conf(), ips());
        let p = plan(&c, &ips);
        let (mut host, mut pod) = created(&p);
        pod.not_local.push("fd00::7".parse().expect("ip"));
        let e = wire(&p, &mut host, &mut pod, &null()).expect_err("must time out");
        let msg = e.to_string();
        assert!(
            msg.contains("fd00::7") && !msg.contains("10.244.0.7"),
            "{msg}"
        );
        assert!(msg.contains("local route"), "{msg}");
    }

    #[test]
    fn refuses_when_the_pod_already_has_the_interface() {
        let (c, ips) = (conf(), ips());
        let p = plan(&c, &ips);
        let (host, mut pod) = created(&p);
        let mut host = host.failing("create veth", libc::EEXIST);
        let e = wire(&p, &mut host, &mut pod, &null()).expect_err("must refuse");
        assert!(matches!(e, Error::AlreadyAttached { .. }), "{e}");
        assert!(!host.sent("delete link"), "nothing deleted: {:?}", host.log);
    }

    #[test]
    fn replaces_its_own_leftover_host_end() {
        let (c, ips) = (conf(), ips());
        let p = plan(&c, &ips);
        for leftover_alias in [Some(alias("net", "c1", "eth0")), None] {
            // Our alias, or no alias but our MAC (killed before the alias).
            let mut host = Fake::default()
                .with_link(&p.host_if, 5, HOST_MAC, leftover_alias.as_deref())
                .failing("create veth", libc::EEXIST);
            // No eth0 in the pod: the name clash is on the host side only.
            let mut pod = Fake::default();
            let e = wire(&p, &mut host, &mut pod, &null());
            // The pod fake never learns about the new eth0, so wiring stops at
            // the pod lookup; what matters is the delete-and-recreate before it.
            assert!(e.is_err());
            assert_eq!(host.count("delete link"), 1, "{:?}", host.log);
            assert_eq!(host.count("create veth"), 2, "{:?}", host.log);
        }
    }

    #[test]
    fn never_deletes_someone_elses_link() {
        let (c, ips) = (conf(), ips());
        let p = plan(&c, &ips);
        for foreign in [Some("nodeplane:net:other:eth0"), None] {
            // A foreign alias, or no alias and not our MAC.
            let mut host = Fake::default()
                .with_link(&p.host_if, 5, [2, 9, 9, 9, 9, 9], foreign)
                .failing("create veth", libc::EEXIST);
            let mut pod = Fake::default();
            let e = wire(&p, &mut host, &mut pod, &null()).expect_err("must refuse");
            assert!(e.to_string().contains("hostInterfacePrefix"), "{e}");
            assert!(!host.sent("delete link"), "{:?}", host.log);
        }
    }

    #[test]
    fn gc_sweep_removes_only_this_networks_stale_links_and_routes() {
        let mut host = Fake::default()
            .with_link("npstale", 5, HOST_MAC, Some("nodeplane:net:gone:eth0"))
            .with_link("npkeep", 6, HOST_MAC, Some("nodeplane:net:live:eth0"))
            .with_link("npother", 7, HOST_MAC, Some("nodeplane:othernet:gone:eth0"))
            .with_link("eth9", 8, [2, 1, 1, 1, 1, 1], None);
        let route = |dst: &str, protocol| netlink::Route {
            dst: dst.parse().expect("ip"),
            prefix: 32,
            gateway: None,
            oif: Some(5),
            protocol,
        };
        host.routes = vec![
            route("10.244.0.9", ROUTE_PROTOCOL),  // ours, stale
            route("10.244.0.10", ROUTE_PROTOCOL), // ours, live
            route("10.244.0.11", 4),              // someone else's (static)
            route("10.99.0.1", ROUTE_PROTOCOL),   // outside this network's CIDRs
        ];
        let keep = |cid: &str, _: &str| cid == "live";
        let live: Vec<IpAddr> = vec!["10.244.0.10".parse().expect("ip")];
        let cidrs = vec!["10.244.0.0/24".parse().expect("cidr")];
        let removed = sweep(&mut host, "net", &keep, &live, &cidrs).expect("sweep");
        assert_eq!(removed, vec!["npstale".to_string()]);
        assert_eq!(
            host.log
                .iter()
                .filter(|l| l.starts_with("delete route"))
                .cloned()
                .collect::<Vec<_>>(),
            vec!["delete route 10.244.0.9"]
        );
    }

    #[test]
    fn names_and_aliases_are_stable_and_parse_back() {
        let a = host_ifname("np", "net", "c1", "eth0");
        assert_eq!(a, host_ifname("np", "net", "c1", "eth0"));
        assert_ne!(a, host_ifname("np", "net", "c1", "eth1"));
        assert_eq!(a.len(), 14);
        assert_eq!(
            parse_alias(&alias("net", "c1", "eth0")),
            Some(("net", "c1", "eth0"))
        );
        let mac = pod_mac("net", "c1", "eth0");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
    }
}
