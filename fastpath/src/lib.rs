//! nodeplane's same-node fast path: pod-to-pod TCP that skips the host's IP
//! forwarding and netfilter when neither changes the outcome.
//!
//! One instance per network and node: a program ([`prog`]) attached at the tc
//! ingress of every host veth of the network, and two maps, `pods` (address
//! → host veth, MAC, flags) and `flows` (pod-to-pod TCP connections seen
//! opening). The CNI plugin creates the instance on the first ADD, attaches
//! it to each new host veth, and keeps `pods` in step with its IPAM records.
//!
//! The instance lives as long as a device holds the program. Nothing is
//! pinned (bpffs need not be mounted, and tests' instances go away with their
//! namespaces); instead the instance's creator also attaches it to a holder,
//! a veth pair that stays down (`npfp…`/`npfq…`, [`holder_names`]), so the
//! instance outlives the network's last pod. Without it, a node going from
//! one pod to none and back would create the maps and load the program again
//! on the next ADD: about 3 ms, most of it preallocating the flows map.
//! Deleting the holder (`ip link del npfp…`) retires the instance once no pod
//! veth holds it either (the next ADD then makes a new one); while a pod
//! veth still holds it, the next ADD gives it a new holder. The plugin finds
//! the instance through the program's id, kept in the network's state
//! directory with the identity of the network namespace it belongs to.
//!
//! Anything the program cannot vouch for (an address it does not know, a pod
//! without the fast flag, UDP, a connection not opened pod to pod) goes the
//! routed way, so a missing or stale entry costs speed, never correctness.

mod asm;
pub mod prog;
mod sys;
mod tc;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use prog::FLAG_FAST;

/// The program's and maps' names, checked when an instance is found by id
/// (an id can be reused by an unrelated program after ours is gone).
const PROG_NAME: &str = "np_fastpath";
const PODS_NAME: &str = "np_pods";
const FLOWS_NAME: &str = "np_flows";
/// Pods per node and network; hash maps are preallocated, so this is memory.
const MAX_PODS: u32 = 4096;
/// Pod-to-pod connections tracked (two entries each); the least recently used
/// is dropped first, and its packets then take the routed path.
const MAX_FLOWS: u32 = 65536;
const STATE_FILE: &str = "fastpath";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fast path: {op} failed: {source} (the kernel needs eBPF with the clsact qdisc and cls_bpf, and CAP_BPF/CAP_NET_ADMIN; set \"fastPath\": false to do without)")]
    Kernel {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("fast path: {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn kernel(op: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let op = op.into();
    move |source| Error::Kernel { op, source }
}

/// One network's program and maps on this node.
#[derive(Debug)]
pub struct Instance {
    prog: OwnedFd,
    pods: OwnedFd,
    flows: OwnedFd,
}

/// A TCP connection the program carries, as its opener sent the SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A pod address as the program knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodEntry {
    /// The host-side veth.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub fast: bool,
}

/// The identity of the calling thread's network namespace.
fn netns_id() -> Result<String> {
    let p = Path::new("/proc/thread-self/ns/net");
    let m = fs::metadata(p).map_err(|source| Error::State {
        path: p.into(),
        source,
    })?;
    Ok(format!("{}:{}", m.dev(), m.ino()))
}

impl Instance {
    /// Finds this network's instance in the caller's network namespace, if
    /// one is alive. `dir` is the network's state directory.
    pub fn find(dir: &Path) -> Result<Option<Instance>> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::State { path, source }),
        };
        let mut words = text.split_whitespace();
        let (Some(id), Some(ns)) = (words.next(), words.next()) else {
            return Ok(None);
        };
        if ns != netns_id()? {
            return Ok(None);
        }
        let Ok(id) = id.parse::<u32>() else {
            return Ok(None);
        };
        Ok(Instance::by_id(id))
    }

    /// Reopens a live instance by its program id; `None` if that id is gone
    /// or is not ours.
    fn by_id(id: u32) -> Option<Instance> {
        let prog = sys::prog_by_id(id).ok()?;
        let info = sys::prog_info(prog.as_raw_fd()).ok()?;
        if info.name != PROG_NAME {
            return None;
        }
        let (mut pods, mut flows) = (None, None);
        for map_id in info.map_ids {
            let fd = sys::map_by_id(map_id).ok()?;
            let m = sys::map_info(fd.as_raw_fd()).ok()?;
            match m.name.as_str() {
                PODS_NAME
                    if m.key_size == prog::POD_KEY_SIZE && m.value_size == prog::POD_VALUE_SIZE =>
                {
                    pods = Some(fd)
                }
                FLOWS_NAME
                    if m.key_size == prog::FLOW_KEY_SIZE
                        && m.value_size == prog::FLOW_VALUE_SIZE =>
                {
                    flows = Some(fd)
                }
                _ => {}
            }
        }
        Some(Instance {
            prog,
            pods: pods?,
            flows: flows?,
        })
    }

    /// Finds the instance or makes it. Creation holds a lock in `dir`, so
    /// concurrent first ADDs agree on one instance.
    ///
    /// A found instance whose holder is gone (deleted by hand) gets a new
    /// holder, so it outlives the pods again; checking costs one ioctl.
    pub fn find_or_create(dir: &Path) -> Result<Instance> {
        if let Some(i) = Instance::find(dir)? {
            if tc::ifindex(&holder_names(dir).0).is_err() {
                i.hold(dir)?;
            }
            return Ok(i);
        }
        let lock_path = dir.join("fastpath.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::State {
                path: lock_path.clone(),
                source,
            })?;
        flock(&lock, &lock_path)?;
        if let Some(i) = Instance::find(dir)? {
            return Ok(i);
        }
        let i = Instance::create()?;
        i.hold(dir)?;
        let id = sys::prog_info(i.prog.as_raw_fd())
            .map_err(kernel("read the program's id"))?
            .id;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join("fastpath.tmp");
        let written = File::create(&tmp)
            .and_then(|mut f| writeln!(f, "{id} {}", netns_id().unwrap_or_default()))
            .and_then(|_| fs::rename(&tmp, &path));
        written.map_err(|source| Error::State { path, source })?;
        Ok(i)
    }

    fn create() -> Result<Instance> {
        let pods = sys::map_create(
            sys::MAP_TYPE_HASH,
            prog::POD_KEY_SIZE,
            prog::POD_VALUE_SIZE,
            MAX_PODS,
            PODS_NAME,
        )
        .map_err(kernel("create the pods map"))?;
        let flows = sys::map_create(
            sys::MAP_TYPE_LRU_HASH,
            prog::FLOW_KEY_SIZE,
            prog::FLOW_VALUE_SIZE,
            MAX_FLOWS,
            FLOWS_NAME,
        )
        .map_err(kernel("create the flows map"))?;
        let code = prog::program(pods.as_raw_fd(), flows.as_raw_fd());
        let prog = sys::prog_load(&code, PROG_NAME).map_err(kernel("load the program"))?;
        Ok(Instance { prog, pods, flows })
    }

    /// Attaches the program to the holder pair of the network whose state
    /// directory is `dir`, creating the pair if needed. A pair left by an
    /// earlier instance (whose state file was lost) is reused: attaching
    /// replaces its filter.
    fn hold(&self, dir: &Path) -> Result<()> {
        let (name, peer) = holder_names(dir);
        match tc::add_veth_pair(&name, &peer) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(kernel(format!("create the holder veth pair {name}/{peer}"))(e))
            }
            _ => {}
        }
        let ifindex = tc::ifindex(&name).map_err(kernel(format!("find the holder {name}")))?;
        self.attach(ifindex)
    }

    /// Attaches the program to a host veth's ingress; already attached is fine.
    pub fn attach(&self, ifindex: u32) -> Result<()> {
        tc::attach_ingress(self.prog.as_raw_fd(), ifindex, PROG_NAME)
            .map_err(kernel(format!("attach to interface {ifindex}")))
    }

    /// Records (or replaces) a pod address.
    pub fn put_pod(&self, ip: IpAddr, entry: PodEntry) -> Result<()> {
        let mut v = [0u8; prog::POD_VALUE_SIZE as usize];
        v[0..4].copy_from_slice(&entry.ifindex.to_ne_bytes());
        v[4..10].copy_from_slice(&entry.mac);
        v[10] = if entry.fast { FLAG_FAST } else { 0 };
        sys::map_update(self.pods.as_raw_fd(), &key(ip), &v)
            .map_err(kernel(format!("record pod address {ip}")))
    }

    /// The entry for a pod address, if any.
    pub fn pod(&self, ip: IpAddr) -> Result<Option<PodEntry>> {
        let mut v = [0u8; prog::POD_VALUE_SIZE as usize];
        let found = sys::map_lookup(self.pods.as_raw_fd(), &key(ip), &mut v)
            .map_err(kernel(format!("look up pod address {ip}")))?;
        Ok(found.then(|| PodEntry {
            ifindex: u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            mac: [v[4], v[5], v[6], v[7], v[8], v[9]],
            fast: v[10] & FLAG_FAST != 0,
        }))
    }

    /// Forgets a pod address, unless it now belongs to another veth (a newer
    /// pod that got the address after a crash between DEL's steps).
    pub fn remove_pod(&self, ip: IpAddr, ifindex: u32) -> Result<()> {
        match self.pod(ip)? {
            Some(e) if e.ifindex == ifindex => sys::map_delete(self.pods.as_raw_fd(), &key(ip))
                .map_err(kernel(format!("forget pod address {ip}"))),
            _ => Ok(()),
        }
    }

    /// The connections the program has taken, as their openers sent the
    /// SYN: how the agent finds the ones a new policy denies, and how tests
    /// see that the fast path carries a flow.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        let mut out = Vec::new();
        let mut k = [0u8; prog::FLOW_KEY_SIZE as usize];
        let mut prev: Option<[u8; prog::FLOW_KEY_SIZE as usize]> = None;
        let fd = self.flows.as_raw_fd();
        while sys::map_next_key(fd, prev.as_ref().map(|p| &p[..]), &mut k)
            .map_err(kernel("list the flows map"))?
        {
            let mut v = [0u8; prog::FLOW_VALUE_SIZE as usize];
            // An entry evicted meanwhile is simply skipped.
            let found = sys::map_lookup(fd, &k, &mut v).map_err(kernel("read the flows map"))?;
            if found && u32::from_ne_bytes(v) == prog::FLOW_OPENER as u32 {
                out.push(Flow {
                    src: addr(&k[0..16]),
                    dst: addr(&k[16..32]),
                    sport: u16::from_be_bytes([k[32], k[33]]),
                    dport: u16::from_be_bytes([k[34], k[35]]),
                });
            }
            prev = Some(k);
        }
        Ok(out)
    }

    /// Forgets a connection, both directions: its next packets take the
    /// routed path, where netfilter judges them.
    pub fn remove_flow(&self, f: &Flow) -> Result<()> {
        let fd = self.flows.as_raw_fd();
        for (src, dst, sport, dport) in [
            (f.src, f.dst, f.sport, f.dport),
            (f.dst, f.src, f.dport, f.sport),
        ] {
            let mut k = [0u8; prog::FLOW_KEY_SIZE as usize];
            k[0..16].copy_from_slice(&key(src));
            k[16..32].copy_from_slice(&key(dst));
            k[32..34].copy_from_slice(&sport.to_be_bytes());
            k[34..36].copy_from_slice(&dport.to_be_bytes());
            sys::map_delete(fd, &k).map_err(kernel("forget a flow"))?;
        }
        Ok(())
    }

    /// Sets or clears a pod address's fast flag; `false` if it is not known.
    pub fn set_fast(&self, ip: IpAddr, fast: bool) -> Result<bool> {
        match self.pod(ip)? {
            Some(e) if e.fast == fast => Ok(true),
            Some(e) => self.put_pod(ip, PodEntry { fast, ..e }).map(|_| true),
            None => Ok(false),
        }
    }
}

/// The holder pair's names for the network whose state directory is `dir`:
/// `npfp` and `npfq` followed by a 32-bit FNV-1a hash of the path, so two
/// networks (or two test nodes sharing a namespace) never share a holder.
/// Host veths are prefix + 12 hex digits, so these never look like one.
pub fn holder_names(dir: &Path) -> (String, String) {
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    (format!("npfp{h:08x}"), format!("npfq{h:08x}"))
}

/// A `pods` key: 16 bytes, IPv4 as ::ffff:a.b.c.d.
fn key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`key`].
fn addr(b: &[u8]) -> IpAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(b);
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn flock(f: &File, path: &Path) -> Result<()> {
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::State {
            path: path.into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (CAP_BPF): the kernel's verifier must accept the program as
    /// assembled, with real maps.
    #[test]
    fn the_verifier_accepts_the_program() {
        let i = Instance::create().expect("create maps and load the program");
        let ip: IpAddr = "10.9.0.7".parse().expect("ip");
        let e = PodEntry {
            ifindex: 7,
            mac: [2, 0, 0, 0, 0, 7],
            fast: true,
        };
        i.put_pod(ip, e).expect("put");
        assert_eq!(i.pod(ip).expect("lookup"), Some(e));
        assert!(i.set_fast(ip, false).expect("set"));
        assert!(!i.pod(ip).expect("lookup").expect("entry").fast);
        i.remove_pod(ip, 8)
            .expect("remove of another veth's entry is a no-op");
        assert!(i.pod(ip).expect("lookup").is_some());
        i.remove_pod(ip, 7).expect("remove");
        assert_eq!(i.pod(ip).expect("lookup"), None);
    }

    #[test]
    fn ipv4_keys_are_mapped() {
        let k = key("10.1.2.3".parse().expect("ip"));
        assert_eq!(&k[10..], &[0xff, 0xff, 10, 1, 2, 3]);
    }
}
