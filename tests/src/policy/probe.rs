//! Probing real network namespaces: start `np-probe-server` in each pod,
//! then try every (from, to, port, protocol) at once, each try on its own
//! thread that has entered the source pod's network namespace.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::matrix::{Cell, Probe, Reachability};
use super::oracle::{PodRef, Proto};

/// A pod as the prober sees it: who it is, its network namespace, its IPv4
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbePod {
    pub pod: PodRef,
    /// A network namespace file: `/run/netns/<name>`, `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// Timeouts and retries for one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Per attempt: the TCP connect (and then the wait for the server's
    /// line), or the wait for a UDP echo.
    pub timeout: Duration,
    /// Attempts before a probe counts as denied. Two by default, so one lost
    /// SYN or datagram does not read as a policy denial.
    pub attempts: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            timeout: Duration::from_millis(400),
            attempts: 2,
        }
    }
}

/// Probes every pod pair for every probe, all in parallel, with the default
/// options. SCTP probes are reported as [`Cell::NotProbed`] (the kernels we
/// test on lack CONFIG_IP_SCTP). See [`observe_with`].
pub fn observe(pods: &[ProbePod], probes: &[Probe]) -> Reachability {
    observe_with(pods, probes, ProbeOptions::default())
}

/// Like [`observe`] with explicit options. Worst case (everything denied)
/// it takes about `timeout * attempts` plus thread start-up.
///
/// A probe is *allowed* only when the round trip completes: TCP connects
/// and the destination's server line (naming that destination pod) arrives;
/// UDP gets its own datagram echoed back. A connection refused, a timeout,
/// or a reply from the wrong server all count as denied (the last also adds
/// a note, since it means traffic went somewhere it should not).
pub fn observe_with(pods: &[ProbePod], probes: &[Probe], opts: ProbeOptions) -> Reachability {
    let start = Instant::now();
    let refs: Vec<PodRef> = pods.iter().map(|p| p.pod.clone()).collect();
    let mut out = Reachability::new(refs, probes, Cell::NotProbed);
    // Open every namespace once; the probe threads share the files.
    let files: Vec<File> = pods
        .iter()
        .map(|p| {
            File::open(&p.netns)
                .unwrap_or_else(|e| panic!("open netns {} of {}: {e}", p.netns.display(), p.pod))
        })
        .collect();
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (fi, from) in pods.iter().enumerate() {
            for to in pods {
                for &probe in probes {
                    if probe.proto == Proto::Sctp {
                        continue;
                    }
                    let ns = &files[fi];
                    let results = &results;
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn_scoped(s, move || {
                            enter_netns(ns, &from.pod);
                            let (cell, note) = probe_from_here(from, to, probe, opts);
                            results.lock().expect("results lock").push(Outcome {
                                from: &from.pod,
                                to: &to.pod,
                                probe,
                                cell,
                                note,
                            });
                        })
                        .expect("spawn probe thread");
                }
            }
        }
    });
    let mut notes = Vec::new();
    for o in results.into_inner().expect("results lock") {
        if let Some(m) = out.matrix_mut(o.probe) {
            m.set(o.from, o.to, o.cell);
        }
        notes.extend(o.note);
    }
    notes.sort();
    if probes.iter().any(|p| p.proto == Proto::Sctp) {
        notes.push("SCTP was not probed (the kernel has no CONFIG_IP_SCTP)".into());
    }
    out.notes = notes;
    out.elapsed = Some(start.elapsed());
    out
}

/// What one probe thread found.
struct Outcome<'a> {
    from: &'a PodRef,
    to: &'a PodRef,
    probe: Probe,
    cell: Cell,
    note: Option<String>,
}

/// Moves the calling thread (only it: setns is per thread) into the network
/// namespace `ns`.
fn enter_netns(ns: &File, pod: &PodRef) {
    // SAFETY: setns with a valid fd and CLONE_NEWNET; it affects only the
    // calling thread, which ends after this probe.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!(
            "setns into the netns of {pod}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One probe from the current thread's namespace (already `from`'s).
fn probe_from_here(
    from: &ProbePod,
    to: &ProbePod,
    probe: Probe,
    opts: ProbeOptions,
) -> (Cell, Option<String>) {
    let addr = SocketAddr::from((to.ip, probe.port));
    match probe.proto {
        Proto::Tcp => tcp_probe(addr, &to.pod, probe.port, opts),
        Proto::Udp => udp_probe(addr, &from.pod, &to.pod, opts),
        Proto::Sctp => (Cell::NotProbed, None),
    }
}

fn tcp_probe(
    addr: SocketAddr,
    to: &PodRef,
    port: u16,
    opts: ProbeOptions,
) -> (Cell, Option<String>) {
    let want = format!("{to} {port}/tcp");
    let mut note = None;
    for _ in 0..opts.attempts.max(1) {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, opts.timeout) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(opts.timeout));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 128];
        // Read the server's one line (it closes right after).
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.contains(&b'\n') || buf.len() > 512 {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let got = String::from_utf8_lossy(&buf);
        let line = got.lines().next().unwrap_or("").trim();
        if line == want {
            return (Cell::Allowed, None);
        }
        if !line.is_empty() {
            note = Some(format!(
                "TCP to {addr} (pod {to}) answered {line:?}, expected {want:?}"
            ));
        }
    }
    (Cell::Denied, note)
}

fn udp_probe(
    addr: SocketAddr,
    from: &PodRef,
    to: &PodRef,
    opts: ProbeOptions,
) -> (Cell, Option<String>) {
    let Ok(sock) = UdpSocket::bind(("0.0.0.0", 0)) else {
        return (Cell::Denied, Some(format!("UDP bind in {from} failed")));
    };
    if sock.connect(addr).is_err() {
        return (Cell::Denied, None);
    }
    let prefix = format!("np-probe {from}->{to} {addr} ");
    let mut buf = [0u8; 512];
    for attempt in 0..opts.attempts.max(1) {
        let msg = format!("{prefix}{attempt}");
        if sock.send(msg.as_bytes()).is_err() {
            // An earlier ICMP error can surface here; try again.
            continue;
        }
        let deadline = Instant::now() + opts.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = sock.set_read_timeout(Some(left));
            match sock.recv(&mut buf) {
                // Any echo of ours counts, a late one from an earlier
                // attempt included: it proves the round trip.
                Ok(n) if buf[..n].starts_with(prefix.as_bytes()) => return (Cell::Allowed, None),
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Refused (ICMP port unreachable) ends this attempt early.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                    break;
                }
                Err(_) => break,
            }
        }
    }
    (Cell::Denied, None)
}

// ---------------------------------------------------------------------------
// Probe servers
// ---------------------------------------------------------------------------

/// A running `np-probe-server` in some network namespace; killed (and
/// reaped) on drop. It also exits by itself if this process dies, because
/// it watches the stdin pipe we hold.
#[derive(Debug)]
pub struct ProbeServer {
    child: Child,
    _stdin: Option<ChildStdin>,
    pub netns: PathBuf,
    pub id: String,
    pub ports: Vec<u16>,
}

impl ProbeServer {
    /// Starts `bin` (the `np-probe-server` binary) inside the network
    /// namespace file `netns`, answering as `id` (use the pod's `ns/name`;
    /// the prober checks TCP replies against it) on TCP and UDP `ports`.
    /// Returns once every socket is bound and listening.
    ///
    /// The child enters the namespace with setns between fork and exec
    /// (like `ip netns exec`, but for any namespace file and without a
    /// mount namespace).
    pub fn start(
        bin: &Path,
        netns: &Path,
        id: &str,
        ports: &[u16],
    ) -> std::io::Result<ProbeServer> {
        let ns = File::open(netns)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--id")
            .arg(id)
            .arg("--exit-on-stdin-eof")
            .args(ports.iter().map(u16::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::netns::enter_in_child(&mut cmd, ns);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        // The server prints "ready" after binding, or exits with an error.
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "ready" {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let status = child.wait()?;
            return Err(std::io::Error::other(format!(
                "{} in {} did not start ({status}): {}",
                bin.display(),
                netns.display(),
                err.trim()
            )));
        }
        Ok(ProbeServer {
            child,
            _stdin: stdin,
            netns: netns.to_path_buf(),
            id: id.to_string(),
            ports: ports.to_vec(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
