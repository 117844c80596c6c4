//! Section 1: from a change in the source to rules in the kernel, with
//! 1,000 pods and 500 policies (see `workload` for the mix).
//!
//! One node namespace runs the agent on a manifests directory. The local
//! pods' attachments are the plugin's records (written before the agent
//! starts, as after a node restart; synthetic pods need no veth: the nft
//! sets only hold interface names). Every wait polls /status (every 5 % of the time waited, ≥ 1 ms)
//! until the agent reports the expected directory digest as programmed.
//! The agent sets `revision` once the rules are in the kernel (inotify →
//! read and parse → compile → netlink/nft) and `flowsRevision` once the
//! conntrack cut after them returned; (b) reports both.

use std::path::Path;
use std::time::{Duration, Instant};

use nodeplane_agent::compiler::Compiler;
use nodeplane_agent::model::Changes;
use nodeplane_agent::nft::{self, Existing, Slots};
use nodeplane_agent::policy;
use nodeplane_proto::agent::request::What;
use nodeplane_proto::agent::{PodAttached, PodDetached};

use crate::agent::{put_file, BenchAgent};
use crate::guard::{Dir, Ns};
use crate::inproc;
use crate::stats::{median, ms, quantile, summary};
use crate::workload::{self, local_ip, Workload, LOCAL_CIDR};
use crate::{Opts, Report};

const PODS: usize = 1000;
const NAMESPACES: usize = 20;
const POLICIES_PER_NS: usize = 25;
/// Pods scheduled on this node but not started, attached one at a time by
/// the single-ADD measurement (on top of the 1,000).
const PENDING: usize = 5;
/// The incremental-change target of issue 3.
const TARGET_INCREMENTAL: Duration = Duration::from_millis(50);
const LIMIT: Duration = Duration::from_secs(120);

pub fn section(opts: &Opts, report: &mut Report) {
    println!(
        "\n== 1. control plane: source change → rules in the kernel (1,000 pods in {NAMESPACES} namespaces, {} policies) ==",
        NAMESPACES * POLICIES_PER_NS
    );
    println!(
        "  agent: manifests source (inotify, re-reads the whole directory); /status polled every max({} ms, 5 % of the wait)",
        opts.poll_ms
    );
    for &local in &opts.local_pods {
        if let Err(e) = scenario(opts, local, report) {
            println!("  ERROR ({local} local pods): {e}");
            report
                .errors
                .push(format!("control, {local} local pods: {e}"));
        }
    }
}

fn scenario(opts: &Opts, local: usize, report: &mut Report) -> Result<(), String> {
    let mut wl = Workload::new(PODS, NAMESPACES, POLICIES_PER_NS, local, PENDING);
    let local = wl.local_count();
    let big = local > 110;
    let changes = opts.changes.unwrap_or(if big { 10 } else { 20 });
    let adds = opts.adds.unwrap_or(if big { 5 } else { 10 });
    println!(
        "\n-- {local} local pods (attached on this node), {} remote pods, {} pending pods --",
        PODS - local,
        PENDING
    );
    let node = Ns::new("nppc");
    let root = Dir::new("policy-bench");
    let cni = root.path().join("cni");
    let stage = root.path().join("stage");
    let shadow = root.path().join("shadow");
    for d in [&cni, &stage, &shadow] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    wl.write_records(&cni)?;
    let files = wl.files()?;
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    // The shadow directory always equals what the agent should end up
    // with, so the expected digest is known before the timed write.
    for (name, text) in &files {
        std::fs::write(shadow.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
    }
    let (objects, _) =
        nodeplane_agent::source::manifests::load_dir(&shadow).map_err(|e| e.to_string())?;
    println!(
        "  manifests: {} files, {:.0} KiB of YAML, {} objects",
        files.len(),
        bytes as f64 / 1024.0,
        objects.len()
    );

    let mut agent = BenchAgent::new(&node, &root.path().join("agent"), &cni, LOCAL_CIDR)?;
    agent.start()?;
    agent.wait_ready(LIMIT)?;
    let st = agent.status().ok_or("no /status")?;
    if st["pods"] != local {
        return Err(format!(
            "agent programs {} pods, expected {local}; status {st}",
            st["pods"]
        ));
    }

    // (a) Full sync: the whole directory appears at once (renames from a
    // staging directory on the same filesystem, which the agent does not
    // watch) into a running agent that already knows its attachments.
    for (name, text) in &files {
        std::fs::write(stage.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
    }
    let want =
        nodeplane_agent::source::manifests::digest_dir(&shadow).map_err(|e| e.to_string())?;
    let tot0 = agent.reconcile_totals().ok_or("no /metrics")?;
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    for (name, _) in &files {
        std::fs::rename(stage.join(name), agent.manifests.join(name))
            .map_err(|e| format!("rename {name}: {e}"))?;
    }
    let (t1, st) = agent.wait_revision(&want, LIMIT)?;
    let full = t1 - t0;
    let tot1 = agent.reconcile_totals().ok_or("no /metrics")?;
    let (reconcile, programs) = (tot1.0 - tot0.0, tot1.1 - tot0.1);
    println!(
        "  in force: {} pods programmed, {} policies, {} rule groups, {} map elements",
        st["pods"], st["policies"], st["groups"], st["elements"]
    );
    println!(
        "  (a) full sync, running agent (empty dir → complete dir): {}  [agent's reconciles: {programs} round(s), {} in all]",
        ms(full),
        secs(Some(reconcile))
    );

    // (b) Incremental: one pod's tier label flips web ↔ api, alternately a
    // local pod (changes which policies select it) and a remote one
    // (changes peer sets of local pods' groups). One file is rewritten.
    let pick = |want_local: bool| {
        wl.pods
            .iter()
            .position(|p| p.local == want_local && p.tier == "web" && p.namespace != "ns-00")
    };
    let targets: Vec<usize> = [pick(true), pick(false)].into_iter().flatten().collect();
    let mut lat = Vec::new();
    let mut lat_by = [Vec::new(), Vec::new()];
    let mut lat_flows = Vec::new();
    let mut rec = Vec::new();
    let mut rounds = Vec::new();
    for r in 0..changes {
        let k = targets[r % targets.len()];
        let pod = &mut wl.pods[k];
        let tier = if pod.labels.get("tier").map(String::as_str) == Some("web") {
            "api"
        } else {
            "web"
        };
        pod.labels.insert("tier".into(), tier.into());
        let (ns_i, is_local) = (wl.namespace_index(&wl.pods[k].namespace), wl.pods[k].local);
        let (name, text) = wl.pod_file(ns_i)?;
        std::fs::write(shadow.join(&name), &text).map_err(|e| format!("write {name}: {e}"))?;
        let want =
            nodeplane_agent::source::manifests::digest_dir(&shadow).map_err(|e| e.to_string())?;
        let before = agent.reconcile_totals().ok_or("no /metrics")?;
        let t0 = Instant::now();
        put_file(&stage, &agent.manifests, &name, &text)?;
        let (t1, _) = agent.wait_revision(&want, LIMIT)?;
        let (t2, _) = agent.wait_flows(&want, LIMIT)?;
        lat.push(t1 - t0);
        lat_by[usize::from(!is_local)].push(t1 - t0);
        lat_flows.push(t2 - t0);
        let after = agent.reconcile_totals().ok_or("no /metrics")?;
        rec.push(Duration::from_secs_f64((after.0 - before.0).max(0.0)));
        rounds.push(after.1 - before.1);
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  (b) incremental pod-label change, file rewritten → rules in the kernel:");
    println!("        all:          {}", summary(&lat));
    for (label, v) in [("local pod: ", &lat_by[0]), ("remote pod:", &lat_by[1])] {
        if !v.is_empty() {
            println!("        {label}   {}", summary(v));
        }
    }
    println!(
        "      … → rules in the kernel and the newly denied established connections cut (conntrack):"
    );
    println!("        all:          {}", summary(&lat_flows));
    println!(
        "        agent's reconciles (compile + nft), Σ per change: {}",
        summary(&rec)
    );
    let mut per: std::collections::BTreeMap<u64, usize> = Default::default();
    for r in &rounds {
        *per.entry(*r).or_default() += 1;
    }
    let per: Vec<String> = per
        .iter()
        .map(|(r, n)| format!("{n}× {r} round(s)"))
        .collect();
    println!(
        "        programming rounds per change: {} (one is enough: more means the agent programmed a half-received relist first)",
        per.join(", ")
    );
    let m = median(&lat);
    let p95 = quantile(&lat, 0.95);
    report.target(
        &format!("incremental change applied ≤ 50 ms, {local} local pods (median)"),
        ms(m.unwrap_or_default()),
        m.is_some_and(|m| m <= TARGET_INCREMENTAL),
    );
    report.target(
        &format!("incremental change applied ≤ 50 ms, {local} local pods (p95)"),
        ms(p95.unwrap_or_default()),
        p95.is_some_and(|m| m <= TARGET_INCREMENTAL),
    );

    // (c) Single ADD: PodAttached for a pod the manifests already hold
    // (scheduled here, no address yet), timed until the agent's reply
    // (sent once the kernel holds its rules); then PodDetached.
    let mut add_lat = Vec::new();
    let mut dels = Vec::new();
    for r in 0..adds {
        let p = &wl.pending[r % wl.pending.len()];
        let ip = local_ip(local + r % wl.pending.len());
        let record = Workload::record(p, ip);
        let attached = PodAttached {
            network: "nodeplane".into(),
            container_id: p.container_id(),
            ifname: "eth0".into(),
            pod_namespace: p.namespace.clone(),
            pod_name: p.name.clone(),
            pod_uid: String::new(),
            host_ifname: p.host_ifname(),
            ips: vec![ip.to_string()],
        };
        let t0 = Instant::now();
        let reply = agent.request(What::Attached(attached))?;
        add_lat.push(t0.elapsed());
        if !reply.programmed {
            return Err(format!("PodAttached not programmed: {}", reply.error));
        }
        // On disk too, as the plugin's ADD leaves it, so the agent's
        // periodic re-read of the records agrees with what it was told.
        workload::write_record(&cni, &record)?;
        std::thread::sleep(Duration::from_millis(50));
        workload::remove_record(&cni, &record);
        let t0 = Instant::now();
        let reply = agent.request(What::Detached(PodDetached {
            network: "nodeplane".into(),
            container_id: p.container_id(),
            ifname: "eth0".into(),
        }))?;
        dels.push(t0.elapsed());
        if !reply.programmed {
            return Err(format!("PodDetached not programmed: {}", reply.error));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  (c) single pod ADD (PodAttached → reply programmed): {}",
        summary(&add_lat)
    );
    println!(
        "      single pod DEL (PodDetached → reply programmed): {}",
        summary(&dels)
    );

    // (d) Cold start: the agent restarts on the complete directory with
    // its table gone (as after a node reboot).
    agent.stop();
    let out = node
        .command("nft")
        .args(["delete", "table", "inet", "nodeplane"])
        .output()
        .map_err(|e| format!("nft delete table: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft delete table: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let want = agent.digest()?;
    let t0 = agent.start()?;
    let (t1, _) = agent.wait_revision(&want, LIMIT)?;
    let tot = agent.reconcile_totals();
    println!(
        "  (d) cold start (agent spawned, no table, complete dir) → programmed: {}  [agent's reconciles: {} round(s), {} in all]",
        ms(t1 - t0),
        tot.map_or("-".into(), |t| t.1.to_string()),
        secs(tot.map(|t| t.0))
    );
    if opts.agent_log.is_some() {
        println!(
            "  agent log ({}):\n{}",
            agent.log.display(),
            agent.log_text()
        );
    }
    drop(agent);

    breakdown(&wl, &shadow, &node, &targets)
}

/// Where the time of one incremental change goes, step by step, measured
/// in-process with the agent's own library functions (agent idle).
fn breakdown(wl: &Workload, dir: &Path, node: &Ns, targets: &[usize]) -> Result<(), String> {
    let records: Vec<_> = wl
        .pods
        .iter()
        .filter(|p| p.local)
        .filter_map(|p| Some(Workload::record(p, p.ip?)))
        .collect();
    let settings = inproc::settings(LOCAL_CIDR)?;
    use nodeplane_agent::source::manifests::{load_dir, DirState};
    let (read, loaded) = inproc::timed(3, || load_dir(dir));
    let (objects, rev) = loaded.map_err(|e| e.to_string())?;
    // What the agent's source does per change: re-read every file, re-parse
    // only the one whose text changed (the same label flip as in (b)).
    let k = targets.first().copied().unwrap_or(0);
    let mut flipped = wl.clone();
    let tier = &mut flipped.pods[k].labels;
    let flip = if tier.get("tier").map(String::as_str) == Some("web") {
        "api"
    } else {
        "web"
    };
    tier.insert("tier".into(), flip.into());
    let ns_i = wl.namespace_index(&wl.pods[k].namespace);
    let versions = [wl.pod_file(ns_i)?, flipped.pod_file(ns_i)?];
    let mut model = nodeplane_agent::model::Model::new(crate::agent::NODE_NAME);
    for ev in nodeplane_agent::source::manifests::relist_events(objects, rev) {
        model.apply(ev);
    }
    model.attachments = inproc::attachments(&records);
    // The source's read of one changed file, and the model applying the
    // events it yields (as the agent's loop does), flipping back and forth.
    let mut state = DirState::default();
    state.update(dir).map_err(|e| e.to_string())?;
    let mut scratch_model = model.clone();
    let (mut cached, mut applied, mut n_events) = (Vec::new(), Vec::new(), 0);
    for i in 1..=4 {
        let (name, text) = &versions[i % 2];
        std::fs::write(dir.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
        let t = Instant::now();
        let events = state
            .update(dir)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        cached.push(t.elapsed());
        n_events = events.len();
        let t = Instant::now();
        for ev in events {
            scratch_model.apply(ev);
        }
        applied.push(t.elapsed());
    }
    let apply = median(&applied).unwrap_or_default();
    let (compile, _) = inproc::timed(5, || policy::compile(&model));
    // The same change as (b): one pod's tier label flipped, compiled as the
    // agent does (an incremental compiler that saw the model before).
    let mut changed = model.clone();
    let key = (wl.pods[k].namespace.clone(), wl.pods[k].name.clone());
    let before = changed.pods.get(&key).cloned();
    if let Some(p) = changed.pods.get_mut(&key) {
        p.labels.insert("tier".into(), flip.into());
    }
    let one_pod = |old| Changes {
        pods: [(key.clone(), old)].into(),
        ..Changes::default()
    };
    let mut compiler = Compiler::default();
    let mut prev = compiler.compile(&model, None);
    let mut next = prev.clone();
    let mut incremental = Vec::new();
    let mut regrouped = (0, 0);
    for i in 0..6 {
        // Flip and flip back: each compile sees exactly one changed pod.
        let (m, old) = if i % 2 == 0 {
            (&changed, before.clone())
        } else {
            (&model, changed.pods.get(&key).cloned())
        };
        let t = Instant::now();
        let c = compiler.compile(m, Some(one_pod(old)));
        incremental.push(t.elapsed());
        regrouped = (compiler.last.compiled, compiler.last.reused);
        if i == 0 {
            next = c;
        } else if i == 1 {
            prev = c;
        }
    }
    // Slots as the agent's after a full sync of `prev` (with spare chains);
    // each delta below is rendered against the slots of the table as it is.
    let mut slots = Slots::default();
    let (render_full, full) = inproc::timed(3, || {
        nft::full(&settings, &Existing::default(), &prev, &mut slots)
    });
    let (render_delta, delta) = inproc::timed(5, || {
        nft::delta(&settings, &prev, &next, &mut slots.clone())
    });
    let back = {
        let mut s = slots.clone();
        let _ = nft::delta(&settings, &prev, &next, &mut s);
        nft::delta(&settings, &next, &prev, &mut s)
    };
    if let Some(dir) = std::env::var_os("POLICY_BENCH_DUMP") {
        // For looking at the transactions by hand (nft -c -f, perf).
        let dir = std::path::PathBuf::from(dir);
        for (name, text) in [
            ("full.nft", full.clone()),
            ("delta.nft", delta.text()),
            ("back.nft", back.text()),
        ] {
            std::fs::write(dir.join(name), text).map_err(|e| format!("write {name}: {e}"))?;
        }
    }
    let scratch = Ns::new("nppx");
    let nft_full = inproc::nft_apply(&scratch, &full)?;
    let (mut nft_delta, mut text_delta) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let d = nft::delta(&settings, &prev, &next, &mut slots);
        nft_delta.push(inproc::script_apply(&scratch, &d)?);
        inproc::script_apply(&scratch, &nft::delta(&settings, &next, &prev, &mut slots))?;
    }
    for _ in 0..3 {
        let d = nft::delta(&settings, &prev, &next, &mut slots);
        text_delta.push(inproc::nft_apply(&scratch, &d.text())?);
        let b = nft::delta(&settings, &next, &prev, &mut slots);
        inproc::nft_apply(&scratch, &b.text())?;
    }
    // The agent's conntrack cut (a ctnetlink dump per family, deletes of
    // what the rules deny), run in the node namespace on a thread of its own.
    let ns_file = node.open();
    let cut_rules = next.clone();
    let exposed: std::collections::HashSet<std::net::IpAddr> = next
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    let conntrack = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid fd changes only this thread's netns.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let (t, r) = inproc::timed(5, || {
            nodeplane_agent::conntrack::cut_denied(&cut_rules, &exposed)
        });
        r.map(|_| t).map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the conntrack timing thread panicked".to_string())??;
    println!("  where one incremental change's time goes (bench process, agent idle; medians):");
    let row = |label: &str, d: Duration, note: String| {
        let line = format!("        {label:<50} {:>10}   {note}", ms(d));
        println!("{}", line.trim_end());
    };
    row(
        "read the directory, re-parse the changed file",
        median(&cached).unwrap_or_default(),
        format!(
            "(DirState::update, as the agent's source; every file parsed: {})",
            ms(read)
        ),
    );
    row(
        "apply the change's events to the model",
        apply,
        format!("({n_events} events)"),
    );
    row(
        "for scale: compile everything (policy::compile)",
        compile,
        format!("({} pods, {} groups)", prev.pods.len(), prev.groups.len()),
    );
    row(
        "recompile after the change (Compiler, incremental)",
        median(&incremental).unwrap_or_default(),
        format!(
            "({} groups recompiled, {} reused)",
            regrouped.0, regrouped.1
        ),
    );
    let changed_elements = delta.element_count();
    let delta_text = delta.text();
    let total: usize = next.groups.values().map(|g| g.v4.len() + g.v6.len()).sum();
    row(
        "render the delta (nft::delta)",
        render_delta,
        format!(
            "(as nft -f text {} lines, {:.1} KiB; {changed_elements} elements added or deleted; cells in all groups: {total})",
            delta_text.lines().count(),
            delta_text.len() as f64 / 1024.0,
        ),
    );
    row(
        "apply the delta (scratch netns, as the agent does)",
        median(&nft_delta).unwrap_or_default(),
        format!(
            "({}; the same delta through nft -f: {})",
            if delta.elements_only() {
                "one netlink batch"
            } else if delta.phases().is_some() {
                "new structure by nft -f, elements by netlink, old structure by nft -f"
            } else {
                "nft -f"
            },
            ms(median(&text_delta).unwrap_or_default())
        ),
    );
    row(
        "conntrack cut (ctnetlink dump v4 + v6, deletes)",
        conntrack,
        String::new(),
    );
    row(
        "for scale: render the full table (nft::full)",
        render_full,
        format!(
            "({} lines, {:.0} KiB; nft -f of it into an empty netns: {})",
            full.lines().count(),
            full.len() as f64 / 1024.0,
            ms(nft_full)
        ),
    );
    Ok(())
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| ms(Duration::from_secs_f64(s)))
}
