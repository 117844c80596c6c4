//! The verbs: ADD, DEL, CHECK, GC, STATUS and VERSION, each a function from a
//! validated invocation and configuration to a result or a CNI error.

use std::collections::HashSet;
use std::fs::File;
use std::net::IpAddr;

use serde_json::{json, Value};

use crate::config::{NetConf, ValidAttachment};
use crate::error::{Error, Result};
use crate::invocation::{Attachment, Command, Invocation};
use crate::ipam::{Pool, Record, Store};
use crate::result::CniResult;
use crate::version::{Version, SUPPORTED};
use crate::wiring::{self, Plan};

/// What a call produced: JSON for stdout (or nothing), and the cniVersion an
/// error object must carry if there was an error.
#[derive(Debug)]
pub struct Outcome {
    pub cni_version: String,
    pub result: Result<Option<Value>>,
}

/// Runs one plugin invocation. Never panics on bad input.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // Decoded once; a decode error only matters to verbs that need a config.
    let stdin: std::result::Result<Value, serde_json::Error> = serde_json::from_slice(stdin);
    let asked: Option<String> = stdin
        .as_ref()
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str))
        .map(str::to_string);
    // The error object echoes the configuration's version when it is one we know.
    let cni_version = asked
        .clone()
        .filter(|v| Version::parse(v).is_ok())
        .unwrap_or_else(|| Version::LATEST.as_str().to_string());
    let result = Invocation::from_env(env).and_then(|inv| match inv.command {
        Command::Version => Ok(Some(version(asked.as_deref()))),
        _ => dispatch(&inv, stdin),
    });
    Outcome {
        cni_version,
        result,
    }
}

fn dispatch(
    inv: &Invocation,
    stdin: std::result::Result<Value, serde_json::Error>,
) -> Result<Option<Value>> {
    let conf = NetConf::from_json(&stdin.map_err(Error::Decode)?)?;
    let log = crate::log::Log::new(conf.log_file.clone(), conf.log_level);
    let started = std::time::Instant::now();
    // Warnings that do not fail the verb (the fast path), for its log line.
    let mut warnings: Vec<String> = Vec::new();
    let out = match (inv.command, &inv.attachment) {
        (Command::Add, Some(a)) => add(&conf, a, &mut warnings).map(Some),
        (Command::Del, Some(a)) => del(&conf, a, &mut warnings).map(|_| None),
        (Command::Check, Some(a)) => check(&conf, a).map(|_| None),
        (Command::Gc, _) => gc(&conf, &mut warnings).map(|_| None),
        (Command::Status, _) => status(&conf).map(|_| None),
        // VERSION returned earlier, and from_env gives ADD, DEL and CHECK an
        // attachment or fails; this arm only keeps the match total.
        _ => Err(Error::Env {
            var: "CNI_COMMAND",
            problem: "this verb needs CNI_CONTAINERID and CNI_IFNAME".into(),
        }),
    };
    // One log line per call: the agent's answer goes on the verb's line.
    let mut note: String = warnings.iter().map(|w| format!("; {w}")).collect();
    if out.is_ok() {
        if let Some(n) = tell_agent(&conf, inv) {
            note.push_str(&format!("; {n}"));
        }
    }
    let who = inv
        .attachment
        .as_ref()
        .map(|a| format!(" {}/{}", a.container_id, a.ifname))
        .unwrap_or_default();
    let took = started.elapsed().as_micros();
    match &out {
        Ok(_) => log.write(
            crate::config::LogLevel::Info,
            &format!("{:?}{who} ok in {took} µs{note}", inv.command),
        ),
        Err(e) => log.write(
            crate::config::LogLevel::Error,
            &format!("{:?}{who} failed in {took} µs: {e}", inv.command),
        ),
    }
    out
}

/// Tells the agent what changed (ADD, DEL, GC); the outcome for the log.
/// Never fails the verb: see [`crate::agent`].
fn tell_agent(conf: &NetConf, inv: &Invocation) -> Option<String> {
    use nodeplane_proto::agent::{
        request::What, Attachment as Valid, AttachmentsValid, PodAttached, PodDetached,
    };
    let what = match (inv.command, &inv.attachment) {
        (Command::Add, Some(a)) => {
            let store = Store::open(&conf.state_dir, &conf.name).ok()?;
            let r = store.record(&a.container_id, &a.ifname).ok()??;
            What::Attached(PodAttached {
                network: conf.name.clone(),
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                pod_namespace: a.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_string(),
                pod_name: a.arg("K8S_POD_NAME").unwrap_or_default().to_string(),
                pod_uid: a.arg("K8S_POD_UID").unwrap_or_default().to_string(),
                host_ifname: r.host_interface,
                ips: r.ips.iter().map(|ip| ip.to_string()).collect(),
            })
        }
        (Command::Del, Some(a)) => What::Detached(PodDetached {
            network: conf.name.clone(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        }),
        (Command::Gc, _) => What::Gc(AttachmentsValid {
            network: conf.name.clone(),
            valid: conf
                .valid_attachments
                .iter()
                .flatten()
                .map(|v| Valid {
                    container_id: v.container_id.clone(),
                    ifname: v.ifname.clone(),
                })
                .collect(),
        }),
        _ => return None,
    };
    Some(match crate::agent::notify(conf, what, conf.agent_timeout) {
        Ok(r) if r.programmed => format!("agent programmed generation {}", r.generation),
        Ok(r) => format!(
            "agent did not program: {}; the pod is left to the agent's fail mode",
            r.error
        ),
        Err(e) => format!("agent not reached ({e}); the pod is left to the agent's fail mode"),
    })
}

/// VERSION: echoes the requested version (or the latest) and lists all.
fn version(asked: Option<&str>) -> Value {
    let asked = asked.unwrap_or(Version::LATEST.as_str());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED })
}

fn pools(conf: &NetConf) -> Vec<Pool> {
    conf.pod_cidrs
        .iter()
        .map(|c| Pool::new(*c, &conf.exclude))
        .collect()
}

fn host_if(conf: &NetConf, a: &Attachment) -> String {
    wiring::host_ifname(&conf.host_prefix, &conf.name, &a.container_id, &a.ifname)
}

fn open_netns(path: &std::path::Path) -> Result<File> {
    File::open(path).map_err(|e| Error::Netns {
        path: path.into(),
        source: e,
    })
}

fn add(conf: &NetConf, a: &Attachment, warnings: &mut Vec<String>) -> Result<Value> {
    let netns_path = a.netns.as_deref().ok_or_else(|| Error::Env {
        var: "CNI_NETNS",
        problem: "not set; ADD needs the pod's network namespace".into(),
    })?;
    // Open the namespace before touching IPAM: a missing netns allocates nothing.
    let pod_ns = open_netns(netns_path)?;
    let prev = conf
        .prev_result
        .as_ref()
        .map(CniResult::from_prev)
        .transpose()?;
    let store = Store::open(&conf.state_dir, &conf.name)?;
    let host_if = host_if(conf, a);

    let (record, allocated_now) = {
        let lock = store.lock()?;
        match store.record(&a.container_id, &a.ifname)? {
            // A repeated ADD (the runtime retrying after a crash) keeps its
            // addresses; wiring below fails if the interface really exists.
            Some(existing) => (existing, false),
            None => {
                let template = Record {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    ips: Vec::new(),
                    host_interface: host_if.clone(),
                    netns: Some(netns_path.display().to_string()),
                    pod_namespace: a.arg("K8S_POD_NAMESPACE").map(str::to_string),
                    pod_name: a.arg("K8S_POD_NAME").map(str::to_string),
                };
                (store.allocate(&lock, &pools(conf), template)?, true)
            }
        }
    };

    let netns_str = netns_path.display().to_string();
    let plan = Plan {
        conf,
        container_id: &a.container_id,
        ifname: &a.ifname,
        netns_path: &netns_str,
        host_if: host_if.clone(),
        ips: &record.ips,
    };
    let wired = wiring::sockets(&netns_str, &pod_ns)
        .and_then(|(mut host, mut pod)| wiring::wire(&plan, &mut host, &mut pod, &pod_ns));
    let host_index = match wired {
        Ok(index) => index,
        Err(e) => return Err(roll_back(conf, a, &store, &host_if, allocated_now, e)),
    };
    warnings.extend(crate::fast::attach(
        conf,
        host_index,
        &record.ips,
        plan.pod_mac(),
    ));
    let ours = plan.result();
    let result = match prev {
        Some(p) => p.merge(ours),
        None => ours,
    };
    Ok(result.to_json(conf.version))
}

/// Undoes what a failed ADD made and passes its error on. An "already
/// attached" failure means the interface or host link belongs to someone
/// else: that is left alone, and so are addresses this call did not allocate
/// (the live pod's).
fn roll_back(
    conf: &NetConf,
    a: &Attachment,
    store: &Store,
    host_if: &str,
    allocated_now: bool,
    e: Error,
) -> Error {
    if !matches!(e, Error::AlreadyAttached { .. }) {
        let _ = wiring::unwire(
            host_if,
            &wiring::alias(&conf.name, &a.container_id, &a.ifname),
        );
    }
    if allocated_now {
        if let Ok(lock) = store.lock() {
            let _ = store.release(&lock, &a.container_id, &a.ifname);
        }
    }
    e
}

fn del(conf: &NetConf, a: &Attachment, warnings: &mut Vec<String>) -> Result<()> {
    let store = Store::open(&conf.state_dir, &conf.name)?;
    let (host_if, ips) = match store.record(&a.container_id, &a.ifname)? {
        Some(r) => (r.host_interface, r.ips),
        None => (host_if(conf, a), Vec::new()),
    };
    // Routes first, addresses after: an address is never free while a route
    // to it still points at the old pod.
    let alias = wiring::alias(&conf.name, &a.container_id, &a.ifname);
    let index = wiring::unwire_detached(&host_if, &alias, &ips)?;
    warnings.extend(crate::fast::detach(conf, index, &ips));
    let lock = store.lock()?;
    store.release(&lock, &a.container_id, &a.ifname)?;
    Ok(())
}

fn check(conf: &NetConf, a: &Attachment) -> Result<()> {
    conf.version.require("CHECK", Version::V0_4_0)?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| Error::config("prevResult", "CHECK needs the prevResult of the ADD"))
        .and_then(CniResult::from_prev)?;
    let netns_path = a.netns.as_deref().ok_or_else(|| Error::Env {
        var: "CNI_NETNS",
        problem: "not set; CHECK needs the pod's network namespace".into(),
    })?;
    let pod_ns = open_netns(netns_path)?;
    let store = Store::open(&conf.state_dir, &conf.name)?;
    let record = store.record(&a.container_id, &a.ifname)?.ok_or_else(|| {
        Error::Drift(format!(
            "no IPAM reservation for {}/{} in network {}",
            a.container_id, a.ifname, conf.name
        ))
    })?;

    let mut drift = Vec::new();
    // Every address prevResult gives our interface must be the one we reserved.
    let netns_str = netns_path.display().to_string();
    let our_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == a.ifname && i.sandbox.as_deref() == Some(netns_str.as_str()));
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_some() && ip.interface == our_if)
    {
        let addr: Option<IpAddr> = ip.address.split('/').next().and_then(|s| s.parse().ok());
        match addr {
            Some(addr) if record.ips.contains(&addr) => {}
            _ => drift.push(format!(
                "prevResult address {} is not reserved for this attachment",
                ip.address
            )),
        }
    }
    let expected_mac = our_if.and_then(|i| prev.interfaces[i].mac.clone());
    let plan = Plan {
        conf,
        container_id: &a.container_id,
        ifname: &a.ifname,
        netns_path: &netns_str,
        host_if: record.host_interface.clone(),
        ips: &record.ips,
    };
    let (mut host, mut pod) = wiring::sockets(&netns_str, &pod_ns)?;
    drift.extend(wiring::verify(
        &plan,
        &mut host,
        &mut pod,
        expected_mac.as_deref(),
    )?);
    if drift.is_empty() {
        Ok(())
    } else {
        Err(Error::Drift(drift.join("; ")))
    }
}

fn gc(conf: &NetConf, warnings: &mut Vec<String>) -> Result<()> {
    conf.version.require("GC", Version::V1_1_0)?;
    let valid: HashSet<ValidAttachment> = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| {
            Error::config(
                "cni.dev/valid-attachments",
                "missing; GC needs the list of attachments to keep (an empty list releases everything)",
            )
        })?
        .into_iter()
        .collect();
    let keep = |cid: &str, ifname: &str| {
        valid.contains(&ValidAttachment {
            container_id: cid.into(),
            ifname: ifname.into(),
        })
    };
    let store = Store::open(&conf.state_dir, &conf.name)?;

    // Links first (outside the lock), then addresses, as in DEL.
    for r in store.records()? {
        if !keep(&r.container_id, &r.ifname) {
            let index = wiring::unwire(
                &r.host_interface,
                &wiring::alias(&conf.name, &r.container_id, &r.ifname),
            )?;
            warnings.extend(crate::fast::detach(conf, index, &r.ips));
        }
    }
    // The route sweep runs under the IPAM lock: an ADD that allocates after
    // the snapshot of live addresses would otherwise lose its fresh route.
    let lock = store.lock()?;
    for r in store.records()? {
        if !keep(&r.container_id, &r.ifname) {
            store.release(&lock, &r.container_id, &r.ifname)?;
        }
    }
    store.sweep_orphans(&lock)?;
    let live_ips: Vec<IpAddr> = store.allocated()?;
    let mut host = wiring::host_socket()?;
    wiring::sweep(&mut host, &conf.name, &keep, &live_ips, &conf.pod_cidrs)?;
    drop(lock);
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    conf.version.require("STATUS", Version::V1_1_0)?;
    let unavailable = |e: Error| Error::NotAvailable(format!("cannot add pods: {e}"));
    let store = Store::open(&conf.state_dir, &conf.name).map_err(unavailable)?;
    let _lock = store.lock().map_err(unavailable)?;
    for pool in pools(conf) {
        if !store.has_free(&pool).map_err(unavailable)? {
            return Err(Error::NotAvailable(format!(
                "cannot add pods: no free address left in {} (network {}); DEL or GC stale pods, or give the node a larger pod CIDR",
                pool.cidr, conf.name
            )));
        }
    }
    Ok(())
}
