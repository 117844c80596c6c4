//! The agent's own steps run inside the bench, one at a time, to see which
//! one dominates a change: reading the manifests, building the model,
//! compiling, rendering the nft transaction, and `nft -f` in a scratch
//! namespace. These are the library functions the agent's loop calls
//! (`nodeplane_agent::{source::manifests, model, policy, nft}`), so the
//! split adds up to what the agent does, minus its process and channels.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nodeplane_agent::model::{Attachment, Model};
use nodeplane_agent::nft::{self, FailMode, Script, Settings};
use nodeplane_cni::ipam::Record;
use nodeplane_tests::Netns;

/// The settings the bench agents run with (table `nodeplane`, prefix `np`).
pub fn settings(pod_cidr: &str) -> Result<Settings, String> {
    Ok(Settings {
        table: "nodeplane".into(),
        iface_prefix: "np".into(),
        fail_mode: FailMode::Isolate,
        pod_cidrs: vec![pod_cidr.parse().map_err(|e| format!("{pod_cidr}: {e}"))?],
        runtime: nodeplane_agent::config::DEFAULT_RUNTIME_LISTEN.parse().ok(),
    })
}

/// The model the agent builds from `manifests` and the plugin's records;
/// also how long reading + parsing the directory took.
pub fn model_from(manifests: &Path, records: &[Record]) -> Result<(Model, Duration), String> {
    let t = Instant::now();
    let (objects, revision) =
        nodeplane_agent::source::manifests::load_dir(manifests).map_err(|e| e.to_string())?;
    let parse = t.elapsed();
    let mut model = Model::new(crate::agent::NODE_NAME);
    for ev in nodeplane_agent::source::manifests::relist_events(objects, revision) {
        model.apply(ev);
    }
    model.attachments = attachments(records);
    Ok((model, parse))
}

/// Records as the agent's periodic re-read turns them into attachments.
pub fn attachments(
    records: &[Record],
) -> BTreeMap<nodeplane_agent::model::AttachmentKey, Attachment> {
    records
        .iter()
        .map(|r| {
            let pod = r.pod_name.clone().map(|n| {
                (
                    r.pod_namespace.clone().unwrap_or_else(|| "default".into()),
                    n,
                )
            });
            (
                (
                    "nodeplane".to_string(),
                    r.container_id.clone(),
                    r.ifname.clone(),
                ),
                Attachment {
                    network: "nodeplane".into(),
                    container_id: r.container_id.clone(),
                    ifname: r.ifname.clone(),
                    pod,
                    host_ifname: r.host_interface.clone(),
                    ips: r.ips.clone(),
                },
            )
        })
        .collect()
}

/// Runs `nft -f -` with `script` inside `ns`; the time from spawn to exit.
pub fn nft_apply(ns: &Netns, script: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("write to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for nft: {e}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "nft -f rejected the transaction: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    Ok(took)
}

/// Median time of `f` over `n` runs (at least one), and its last result.
pub fn timed<T>(n: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let t = Instant::now();
    let mut last = f();
    let mut samples = vec![t.elapsed()];
    for _ in 1..n {
        let t = Instant::now();
        last = f();
        samples.push(t.elapsed());
    }
    (crate::stats::median(&samples).unwrap_or_default(), last)
}

/// Applies `script` inside `ns` as the agent does ([`nft::apply_script`]:
/// netlink when it only changes elements, else `nft -f`); returns the time.
pub fn script_apply(ns: &Netns, script: &Script) -> Result<Duration, String> {
    let file = ns.open();
    let script = script.clone();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid fd changes only this thread's netns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let t = Instant::now();
        nft::apply_script(&script).map_err(|e| e.to_string())?;
        Ok(t.elapsed())
    })
    .join()
    .map_err(|_| "the nft thread panicked".to_string())?
}
