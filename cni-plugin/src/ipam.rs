//! On-disk IPAM: which pod holds which address, safe under concurrent
//! invocations and under kill -9 at any instant.
//!
//! Layout under `<stateDir>/<network>/`:
//! - `lock`: flock(2)ed for every read-modify-write; the kernel drops it when
//!   the holder dies, so a killed plugin never wedges the node.
//! - `attachments/<containerID>:<ifname>`: one JSON [`Record`] per attachment.
//! - `ips/<address>`: one file per allocated address holding its owner. The
//!   file's existence is the allocation, so an address can never be handed out
//!   twice.
//! - `last.v4`, `last.v6`: where the previous allocation ended, so the next
//!   search starts there (O(1) per ADD however many pods exist, and released
//!   addresses are reused last, which keeps stale conntrack state away).
//!
//! Crash safety comes from ordering, not journaling: ADD writes the record
//! before the address files and DEL removes address files before the record,
//! so whatever a kill -9 leaves, every address file is owned by a record or is
//! an orphan that GC (and a repeated DEL) can recognise and remove.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How long an invocation waits for the IPAM lock before answering code 11.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many candidates are probed per pool; a /64 is never scanned
/// end to end, and a pool this full is reported as exhausted.
const SCAN_LIMIT: u128 = 1 << 20;

/// What the store knows about one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    /// The host-side veth, for DEL and GC cleanup.
    pub host_interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// One pod CIDR with the addresses never to hand out.
#[derive(Debug, Clone)]
pub struct Pool {
    pub cidr: IpNetwork,
    pub exclude: Vec<IpNetwork>,
}

impl Pool {
    pub fn new(cidr: IpNetwork, all_excludes: &[IpNetwork]) -> Pool {
        let exclude = all_excludes
            .iter()
            .filter(|e| e.is_ipv4() == cidr.is_ipv4())
            .copied()
            .collect();
        Pool { cidr, exclude }
    }

    fn family_tag(&self) -> &'static str {
        if self.cidr.is_ipv4() {
            "v4"
        } else {
            "v6"
        }
    }

    /// First and last assignable host numbers (network and IPv4 broadcast excluded).
    fn bounds(&self) -> (u128, u128) {
        let base = to_u128(self.cidr.network());
        let bits = if self.cidr.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - u32::from(self.cidr.prefix());
        let size: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let last = if self.cidr.is_ipv4() {
            base + size - 2
        } else {
            base + (size - 1)
        };
        (base + 1, last)
    }

    fn assignable(&self, ip: IpAddr) -> bool {
        !self.exclude.iter().any(|e| e.contains(ip))
    }

    fn ip(&self, n: u128) -> IpAddr {
        from_u128(n, self.cidr.is_ipv4())
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((n as u32).into())
    } else {
        IpAddr::V6(n.into())
    }
}

/// The IPAM store of one network.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Proof that the caller holds the network's IPAM lock.
#[derive(Debug)]
pub struct Locked {
    _file: File,
}

impl Store {
    /// Opens (creating if needed) the store for `network` under `state_dir`.
    pub fn open(state_dir: &Path, network: &str) -> Result<Store> {
        let dir = state_dir.join(network);
        for sub in ["ips", "attachments"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::state(&p, e))?;
        }
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the network's exclusive lock, waiting up to [`LOCK_TIMEOUT`].
    pub fn lock(&self) -> Result<Locked> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::state(&path, e))?;
        flock_with_timeout(&file, LOCK_TIMEOUT).map_err(|e| match e.kind() {
            ErrorKind::TimedOut => Error::LockTimeout {
                path: path.clone(),
                waited_ms: LOCK_TIMEOUT.as_millis() as u64,
            },
            _ => Error::state(&path, e),
        })?;
        Ok(Locked { _file: file })
    }

    fn record_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join("attachments")
            .join(format!("{container_id}:{ifname}"))
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join("ips").join(ip.to_string())
    }

    /// The record of one attachment. An empty or unreadable record (a crash
    /// between creating and writing it) reads as absent: no address file can
    /// exist for it yet, because address files are written after the record.
    pub fn record(&self, container_id: &str, ifname: &str) -> Result<Option<Record>> {
        let path = self.record_path(container_id, ifname);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::state(&path, e)),
        }
    }

    /// Every readable record.
    pub fn records(&self) -> Result<Vec<Record>> {
        Ok(self.scan()?.0)
    }

    /// Every readable record, and the paths of torn (empty) ones. Reading is
    /// safe without the lock; only a lock holder may remove a torn record,
    /// since outside the lock it may be an ADD's record between its creation
    /// and its single write.
    fn scan(&self) -> Result<(Vec<Record>, Vec<PathBuf>)> {
        let dir = self.dir.join("attachments");
        let (mut records, mut torn) = (Vec::new(), Vec::new());
        for entry in fs::read_dir(&dir).map_err(|e| Error::state(&dir, e))? {
            let entry = entry.map_err(|e| Error::state(&dir, e))?;
            if let Some((cid, ifname)) = entry.file_name().to_str().and_then(|n| n.split_once(':'))
            {
                match self.record(cid, ifname)? {
                    Some(r) => records.push(r),
                    None => torn.push(entry.path()),
                }
            }
        }
        Ok((records, torn))
    }

    /// Allocates one address from each pool for `template`'s attachment and
    /// persists the record. Fails with PoolExhausted when any pool is full.
    pub fn allocate(&self, _lock: &Locked, pools: &[Pool], mut template: Record) -> Result<Record> {
        template.ips.clear();
        for pool in pools {
            let ip = self.find_free(pool)?.ok_or_else(|| Error::PoolExhausted {
                network: self.network_name(),
                cidr: pool.cidr.to_string(),
            })?;
            template.ips.push(ip);
        }
        // Record first, then address files: see the module comment.
        let path = self.record_path(&template.container_id, &template.ifname);
        let json = serde_json::to_vec(&template).map_err(|e| Error::CorruptState {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        write_file(&path, &json, false)?;
        let owner = format!("{}\n{}\n", template.container_id, template.ifname);
        for (pool, ip) in pools.iter().zip(&template.ips) {
            write_file(&self.ip_path(*ip), owner.as_bytes(), true)?;
            // Best effort: a lost hint only costs a longer search next time.
            let _ = fs::write(
                self.dir.join(format!("last.{}", pool.family_tag())),
                ip.to_string(),
            );
        }
        Ok(template)
    }

    fn network_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The next free address after the last allocation, wrapping around.
    fn find_free(&self, pool: &Pool) -> Result<Option<IpAddr>> {
        let (first, last) = pool.bounds();
        let hint = fs::read_to_string(self.dir.join(format!("last.{}", pool.family_tag())))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .filter(|ip| pool.cidr.contains(*ip))
            .map(to_u128);
        let span = last - first + 1;
        let mut n = match hint {
            Some(h) if h >= first && h < last => h + 1,
            _ => first,
        };
        for _ in 0..span.min(SCAN_LIMIT) {
            let ip = pool.ip(n);
            if pool.assignable(ip) && !exists(&self.ip_path(ip))? {
                return Ok(Some(ip));
            }
            n = if n >= last { first } else { n + 1 };
        }
        Ok(None)
    }

    /// True when `pool` still has an assignable address (for STATUS).
    pub fn has_free(&self, pool: &Pool) -> Result<bool> {
        Ok(self.find_free(pool)?.is_some())
    }

    /// Releases an attachment's addresses and record. Idempotent: releasing
    /// an unknown attachment returns `None`. Only address files this
    /// attachment owns are removed, so a stale DEL cannot free a reused address.
    pub fn release(
        &self,
        _lock: &Locked,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Record>> {
        let record = self.record(container_id, ifname)?;
        if let Some(r) = &record {
            for ip in &r.ips {
                let path = self.ip_path(*ip);
                match self.owner(*ip)? {
                    Some(Some((c, i))) if c == container_id && i == ifname => remove(&path)?,
                    Some(None) => remove(&path)?, // torn write by this very attachment
                    _ => {}
                }
            }
        }
        remove(&self.record_path(container_id, ifname))?;
        Ok(record)
    }

    /// Who holds `ip`: `None` if free, `Some(None)` if the file is torn.
    fn owner(&self, ip: IpAddr) -> Result<Option<Option<(String, String)>>> {
        let path = self.ip_path(ip);
        match fs::read_to_string(&path) {
            Ok(s) => {
                let mut lines = s.lines();
                Ok(Some(match (lines.next(), lines.next()) {
                    (Some(c), Some(i)) if !c.is_empty() => Some((c.to_string(), i.to_string())),
                    _ => None,
                }))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::state(&path, e)),
        }
    }

    /// Every allocated address.
    pub fn allocated(&self) -> Result<Vec<IpAddr>> {
        let dir = self.dir.join("ips");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::state(&dir, e))? {
            let entry = entry.map_err(|e| Error::state(&dir, e))?;
            if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// Removes address files no record claims (left by a crash between the
    /// two writes of ADD or DEL). Returns the addresses freed.
    /// Torn records (a crash between creating and writing one) own nothing
    /// and are removed too.
    pub fn sweep_orphans(&self, _lock: &Locked) -> Result<Vec<IpAddr>> {
        let (records, torn) = self.scan()?;
        for path in torn {
            remove(&path)?;
        }
        let claimed: HashSet<IpAddr> = records.into_iter().flat_map(|r| r.ips).collect();
        let mut freed = Vec::new();
        for ip in self.allocated()? {
            if !claimed.contains(&ip) {
                remove(&self.ip_path(ip))?;
                freed.push(ip);
            }
        }
        Ok(freed)
    }
}

fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::state(path, e)),
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::state(path, e)),
    }
}

/// Writes `bytes` in one write(2), so a kill -9 leaves the file either
/// empty or complete, never half-written. `exclusive` refuses to overwrite.
fn write_file(path: &Path, bytes: &[u8], exclusive: bool) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if exclusive {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts.open(path).map_err(|e| Error::state(path, e))?;
    f.write_all(bytes).map_err(|e| Error::state(path, e))
}

/// flock(LOCK_EX) that gives up after `timeout` (as `ErrorKind::TimedOut`).
fn flock_with_timeout(file: &File, timeout: Duration) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err);
    }
    // Contended: poll with a short, capped backoff. Holders keep the lock for
    // about a hundred microseconds (no kernel work happens under it), so a
    // waiter never oversleeps by much, and no signal handler (process-wide
    // state a library must not take) is needed for the timeout.
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = Duration::from_micros(20);
    loop {
        std::thread::sleep(pause);
        // SAFETY: as above.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err);
        }
        if std::time::Instant::now() >= deadline {
            return Err(ErrorKind::TimedOut.into());
        }
        pause = (pause * 2).min(Duration::from_micros(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "np-ipam-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn rec(cid: &str) -> Record {
        Record {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ips: vec![],
            host_interface: format!("np{cid}"),
            netns: None,
            pod_namespace: None,
            pod_name: None,
        }
    }

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().expect("cidr"), &[])
    }

    #[test]
    fn allocates_distinct_addresses_until_exhausted_then_reuses_released_ones() {
        let dir = tmp();
        let store = Store::open(&dir, "net").expect("open");
        let pools = [pool("10.1.0.0/29")]; // .1 .. .6
        let lock = store.lock().expect("lock");
        let mut seen = HashSet::new();
        for i in 0..6 {
            let r = store
                .allocate(&lock, &pools, rec(&format!("c{i}")))
                .expect("allocate");
            assert!(seen.insert(r.ips[0]), "duplicate {}", r.ips[0]);
        }
        let e = store
            .allocate(&lock, &pools, rec("c6"))
            .expect_err("exhausted");
        assert_eq!(e.code(), crate::error::code::POOL_EXHAUSTED);
        assert!(!store.has_free(&pools[0]).expect("status"));
        let released = store
            .release(&lock, "c2", "eth0")
            .expect("release")
            .expect("known");
        let again = store
            .allocate(&lock, &pools, rec("c7"))
            .expect("reuses the freed address");
        assert_eq!(again.ips, released.ips);
        assert!(store
            .release(&lock, "c2", "eth0")
            .expect("idempotent")
            .is_none());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn skips_network_broadcast_and_excluded_addresses() {
        let dir = tmp();
        let store = Store::open(&dir, "net").expect("open");
        let p = Pool::new(
            "10.2.0.0/30".parse().expect("cidr"),
            &["10.2.0.1/32".parse().expect("cidr")],
        );
        let lock = store.lock().expect("lock");
        let r = store
            .allocate(&lock, std::slice::from_ref(&p), rec("a"))
            .expect("allocate");
        assert_eq!(r.ips[0].to_string(), "10.2.0.2");
        assert!(store.allocate(&lock, &[p], rec("b")).is_err());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn dual_stack_gets_one_address_per_family() {
        let dir = tmp();
        let store = Store::open(&dir, "net").expect("open");
        let lock = store.lock().expect("lock");
        let r = store
            .allocate(&lock, &[pool("10.3.0.0/24"), pool("fd00:3::/64")], rec("a"))
            .expect("allocate");
        assert_eq!(r.ips.len(), 2);
        assert!(r.ips[0].is_ipv4() && r.ips[1].is_ipv6());
        assert_eq!(store.record("a", "eth0").expect("read"), Some(r));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn crash_leftovers_are_recognised() {
        let dir = tmp();
        let store = Store::open(&dir, "net").expect("open");
        let lock = store.lock().expect("lock");
        // A crash after the address file but with the record lost, and a torn record.
        fs::write(
            store.ip_path("10.4.0.9".parse().expect("ip")),
            "ghost\neth0\n",
        )
        .expect("write");
        fs::write(store.record_path("torn", "eth0"), "").expect("write");
        assert_eq!(store.record("torn", "eth0").expect("read"), None);
        let freed = store.sweep_orphans(&lock).expect("sweep");
        assert_eq!(freed.len(), 1);
        assert!(store.allocated().expect("list").is_empty());
        assert!(store.records().expect("records").is_empty());
        assert!(
            !store.record_path("torn", "eth0").exists(),
            "torn record removed under the lock"
        );
        let _ = fs::remove_dir_all(dir);
    }
}
