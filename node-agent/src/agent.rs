//! The agent's one loop: applies source events and plugin notifications to
//! the model, and after each batch compiles and programs the kernel.
//!
//! Nothing is programmed before every source kind has synced: an
//! incomplete model would look like "no policies" and open every pod. Until
//! then the table from the agent's previous life (if any) stays in force,
//! which is why kill -9 and restart never interrupts allowed traffic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeplane_proto::agent::{request::What, Reply, Request};
use tokio::sync::{mpsc, oneshot};

use crate::compiler::Compiler;
use crate::config::Config;
use crate::model::{Attachment, AttachmentKey, Model};
use crate::nft::{self, Settings};
use crate::policy::Compiled;
use crate::source::Event;

/// A plugin request waiting for its reply.
#[derive(Debug)]
pub struct ApiCall {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// What /readyz, /metrics and /status report.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub synced: bool,
    pub programmed: bool,
    pub generation: u64,
    /// The source revision whose rules were last put in force.
    pub revision: String,
    /// The revision whose denied established connections were also cut
    /// (set right after `revision`, once the conntrack cut returned).
    pub flows_revision: String,
    pub pods: usize,
    pub policies: usize,
    pub groups: usize,
    pub elements: usize,
    pub reconciles: u64,
    pub reconcile_seconds_sum: f64,
    pub last_reconcile_seconds: f64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub conntrack_cut: u64,
    /// Counter name → policy "namespace/name".
    pub counters: BTreeMap<String, String>,
    pub draining: bool,
}

pub type SharedStatus = Arc<Mutex<Status>>;

/// How often attachments are re-read from the plugin's state, to catch
/// ADDs and DELs whose notification the agent missed.
const RESYNC: Duration = Duration::from_secs(10);

pub struct Agent {
    cfg: Config,
    model: Model,
    compiler: Compiler,
    applied: Option<Compiled>,
    /// Where the applied groups live in the table (see [`nft::Slots`]).
    slots: nft::Slots,
    status: SharedStatus,
    waiting: Vec<oneshot::Sender<Reply>>,
    /// Pods as the CRI shim reported them (labels known before CNI ADD).
    shim: Option<Arc<crate::lifecycle::Lifecycle>>,
    /// Where the app runtime's pod directory is published, and what it
    /// was last built from (apps generation, local pods).
    directory: Option<tokio::sync::watch::Sender<Arc<nodeplane_runtime::directory::Directory>>>,
    published: Option<(u64, BTreeMap<crate::model::PodKey, Vec<IpAddr>>)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node_name)
            .finish()
    }
}

impl Agent {
    pub fn new(cfg: Config, status: SharedStatus) -> Self {
        let model = Model::new(&cfg.node_name);
        Agent {
            cfg,
            model,
            compiler: Compiler::default(),
            applied: None,
            slots: nft::Slots::default(),
            status,
            waiting: Vec::new(),
            shim: None,
            directory: None,
            published: None,
        }
    }

    /// Lets the agent take a new pod's labels from the CRI shim's report
    /// when the sources have not delivered the pod yet.
    pub fn with_shim(mut self, shim: Arc<crate::lifecycle::Lifecycle>) -> Self {
        self.shim = Some(shim);
        self
    }

    /// Publishes the app runtime's pod directory from the model.
    pub fn with_directory(
        mut self,
        tx: tokio::sync::watch::Sender<Arc<nodeplane_runtime::directory::Directory>>,
    ) -> Self {
        self.directory = Some(tx);
        self
    }

    /// Rebuilds the runtime's directory when pods' app facts or the local
    /// pods changed.
    fn publish_directory(&mut self) {
        let Some(tx) = &self.directory else {
            return;
        };
        let local = crate::runtime::local_pods(&self.model);
        let now = (self.model.apps_generation, local);
        if self.published.as_ref() == Some(&now) {
            return;
        }
        let dir = crate::runtime::directory(&self.model, &now.1, self.shim.as_deref());
        tx.send_replace(Arc::new(dir));
        self.published = Some(now);
    }

    /// The shim's view of a pod the model does not know yet, as a
    /// provisional model pod.
    fn adopt_shim_pod(&mut self, key: &(String, String), ips: &[IpAddr]) -> bool {
        let Some(shim) = &self.shim else {
            return false;
        };
        let Some(p) = shim
            .pods()
            .into_iter()
            .find(|p| p.namespace == key.0 && p.name == key.1)
        else {
            return false;
        };
        let info = crate::model::PodInfo {
            labels: p.labels.into_iter().collect(),
            node_name: Some(self.cfg.node_name.clone()),
            ips: ips.to_vec(),
            host_network: false,
            ports: Vec::new(),
        };
        self.model.provisional_pod(key.clone(), info)
    }

    /// Runs until `stop` fires or both input channels close.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut calls: mpsc::Receiver<ApiCall>,
        mut stop: oneshot::Receiver<()>,
    ) {
        self.read_attachments();
        let mut resync = tokio::time::interval(RESYNC);
        let mut dirty = true;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => {
                        dirty |= self.model.apply(ev);
                        // Take the whole batch before programming once.
                        while let Ok(ev) = events.try_recv() {
                            dirty |= self.model.apply(ev);
                        }
                        // A revision marker alone still has to be reported.
                        dirty |= self.status().revision != self.model.revision;
                    }
                    None => {
                        tracing::error!("the source stopped; keeping the rules in force");
                        break;
                    }
                },
                call = calls.recv() => if let Some(call) = call {
                    dirty |= self.call(call);
                    while let Ok(call) = calls.try_recv() {
                        dirty |= self.call(call);
                    }
                },
                _ = resync.tick() => dirty |= self.read_attachments(),
                _ = &mut stop => break,
            }
            // Never program a half-received relist: it would put a mix of
            // the old and new state into the kernel, then program again.
            if dirty && self.model.is_synced() && !self.model.is_relisting() {
                // Programming runs nft and conntrack synchronously: tell
                // the runtime, so the HTTP and socket tasks move to another
                // worker instead of waiting behind it.
                dirty = !tokio::task::block_in_place(|| self.program());
            }
            // After programming: a pod waiting in ADD is answered first.
            self.publish_directory();
        }
        // Drain: the rules stay in the kernel (traffic keeps flowing with
        // the last programmed policy); only waiting plugins are answered.
        for w in self.waiting.drain(..) {
            let _ = w.send(Reply {
                programmed: false,
                error: "agent is shutting down".into(),
                generation: 0,
            });
        }
        tracing::info!("drained; nftables table left in force");
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one plugin request; true if the model changed.
    fn call(&mut self, call: ApiCall) -> bool {
        let changed = match call.request.what {
            Some(What::Attached(a)) => {
                let ips: Vec<IpAddr> = a.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
                let pod = (!a.pod_name.is_empty()).then(|| {
                    let ns = if a.pod_namespace.is_empty() {
                        "default".to_string()
                    } else {
                        a.pod_namespace.clone()
                    };
                    (ns, a.pod_name.clone())
                });
                let att = Attachment {
                    network: a.network.clone(),
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                    pod,
                    host_ifname: a.host_ifname.clone(),
                    ips,
                };
                let mut changed = false;
                if let Some(pod) = &att.pod {
                    if !self.model.pods.contains_key(pod) {
                        changed |= self.adopt_shim_pod(&pod.clone(), &att.ips);
                    }
                }
                let key = (a.network, a.container_id, a.ifname);
                (self.model.attachments.insert(key, att.clone()) != Some(att)) | changed
            }
            Some(What::Detached(d)) => self
                .model
                .attachments
                .remove(&(d.network, d.container_id, d.ifname))
                .is_some(),
            Some(What::Gc(gc)) => {
                let valid: Vec<(String, String)> = gc
                    .valid
                    .into_iter()
                    .map(|v| (v.container_id, v.ifname))
                    .collect();
                let before = self.model.attachments.len();
                self.model.attachments.retain(|(net, cid, ifname), _| {
                    net != &gc.network || valid.iter().any(|(c, i)| c == cid && i == ifname)
                });
                before != self.model.attachments.len()
            }
            // api.rs routes these to crate::lifecycle; never queued here.
            Some(What::Lifecycle(_)) | None => {
                let _ = call.reply.send(Reply {
                    programmed: false,
                    error: "empty request".into(),
                    generation: 0,
                });
                return false;
            }
        };
        if !changed && self.applied.is_some() {
            let generation = self.status().generation;
            let _ = call.reply.send(Reply {
                programmed: true,
                error: String::new(),
                generation,
            });
        } else {
            self.waiting.push(call.reply);
        }
        changed
    }

    /// Re-reads the plugin's attachment records (the on-disk truth); true
    /// if they differ from the model's.
    fn read_attachments(&mut self) -> bool {
        let mut found: BTreeMap<AttachmentKey, Attachment> = BTreeMap::new();
        for net in &self.cfg.networks {
            let store = match nodeplane_cni::ipam::Store::open(&self.cfg.cni_state_dir, net) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(network = %net, error = %e, "no CNI state");
                    continue;
                }
            };
            let records = match store.records() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(network = %net, error = %e, "cannot read CNI attachments");
                    return false;
                }
            };
            for r in records.into_iter().filter(|r| !r.ips.is_empty()) {
                let pod = r.pod_name.clone().map(|n| {
                    (
                        r.pod_namespace.clone().unwrap_or_else(|| "default".into()),
                        n,
                    )
                });
                let key = (net.clone(), r.container_id.clone(), r.ifname.clone());
                found.insert(
                    key,
                    Attachment {
                        network: net.clone(),
                        container_id: r.container_id,
                        ifname: r.ifname,
                        pod,
                        host_ifname: r.host_interface,
                        ips: r.ips,
                    },
                );
            }
        }
        if found == self.model.attachments {
            return false;
        }
        self.model.attachments = found;
        true
    }

    fn settings(&self) -> Settings {
        let pod_cidrs = if self.cfg.pod_cidrs.is_empty() {
            self.model
                .node_pod_cidrs
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect()
        } else {
            self.cfg.pod_cidrs.clone()
        };
        Settings {
            table: self.cfg.table.clone(),
            iface_prefix: self.cfg.iface_prefix.clone(),
            fail_mode: self.cfg.fail_mode,
            pod_cidrs,
            runtime: self.cfg.runtime.as_ref().and_then(|r| r.listen),
        }
    }

    /// Marks every network as policed, so the CNI plugin records new pods
    /// without the fast path's flag: from here on, only this agent decides
    /// which pods may skip netfilter. Written before any policy is
    /// programmed, and never removed (the table outlives the process).
    fn mark_policed(&self) {
        for net in &self.cfg.networks {
            let path = nodeplane_cni::fast::policed_marker(&self.cfg.cni_state_dir, net);
            if path.exists() {
                continue;
            }
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&path, b"nodeplane-agent\n"));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "cannot mark the network as policed");
            }
        }
    }

    /// Compiles and programs; true on success.
    fn program(&mut self) -> bool {
        self.mark_policed();
        let start = Instant::now();
        let changes = self.model.take_changes();
        let next = self.compiler.compile(&self.model, Some(changes));
        let compiled = start.elapsed();
        // Pods the new rules isolate leave the fast path before the rules
        // apply; pods they leave alone join it after (see `sync_fast_path`).
        self.sync_fast_path(&next, false);
        let settings = self.settings();
        let slots = &mut self.slots;
        // Only a delta is rendered apart from applying it (a full sync
        // renders inside `full_sync`).
        let mut render_ms = None;
        let result = match &self.applied {
            Some(prev) => {
                let script = nft::delta(&settings, prev, &next, slots);
                render_ms = Some((start.elapsed() - compiled).as_secs_f64() * 1000.0);
                nft::apply_script(&script).or_else(|e| {
                    // The kernel is not what we last applied (someone edited
                    // or deleted the table): converge from a read-back.
                    tracing::warn!(error = %e, "incremental update failed; rewriting the table");
                    full_sync(&settings, &next, slots)
                })
            }
            None => full_sync(&settings, &next, slots),
        };
        let elapsed = start.elapsed().as_secs_f64();
        let mut st = self.status();
        st.reconciles += 1;
        st.reconcile_seconds_sum += elapsed;
        st.last_reconcile_seconds = elapsed;
        st.synced = true;
        let ok = match result {
            Ok(()) => {
                st.programmed = true;
                st.generation += 1;
                st.revision = self.model.revision.clone();
                st.pods = next.pods.len();
                st.policies = next.policies.len();
                st.groups = next.groups.len();
                st.elements = next.groups.values().map(|g| g.v4.len() + g.v6.len()).sum();
                st.counters = next
                    .counters
                    .iter()
                    .map(|(c, (ns, n))| (c.clone(), format!("{ns}/{n}")))
                    .collect();
                st.last_error = None;
                tracing::info!(
                    generation = st.generation,
                    pods = st.pods,
                    policies = st.policies,
                    groups = st.groups,
                    ms = elapsed * 1000.0,
                    compile_ms = compiled.as_secs_f64() * 1000.0,
                    render_ms,
                    "programmed"
                );
                true
            }
            Err(e) => {
                st.errors += 1;
                st.last_error = Some(e.to_string());
                tracing::error!(error = %e, "programming failed; will retry");
                false
            }
        };
        let generation = st.generation;
        drop(st);
        if ok {
            // The rules are in force: new connections already follow them,
            // so the pods waiting in ADD go now, before the conntrack cut.
            for w in self.waiting.drain(..) {
                let _ = w.send(Reply {
                    programmed: true,
                    error: String::new(),
                    generation,
                });
            }
            self.sync_fast_path(&next, true);
            self.cut_flows(&next);
            self.publish_pod_cidrs(&settings);
            self.applied = Some(next);
            self.replenish(&settings);
        }
        ok
    }

    /// Keeps the CNI fast path's per-pod flag in step with policy: a pod may
    /// skip netfilter (same-node pod-to-pod TCP, see nodeplane-fastpath) only
    /// when the agent knows the pod and no policy isolates it either way.
    /// With `set` false only flags are cleared (before new rules apply), with
    /// `set` true only set (after), so no packet ever skips a rule in force.
    fn sync_fast_path(&self, next: &Compiled, set: bool) {
        for net in &self.cfg.networks {
            let dir = self.cfg.cni_state_dir.join(net);
            let instance = match nodeplane_fastpath::Instance::find(&dir) {
                Ok(Some(i)) => i,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(network = %net, error = %e, "cannot open the fast path");
                    continue;
                }
            };
            for p in next.pods.iter().filter(|p| &p.attachment.0 == net) {
                let fast = p.pod.is_some() && p.ingress.is_none() && p.egress.is_none();
                if fast != set {
                    continue;
                }
                for ip in &p.ips {
                    if let Err(e) = instance.set_fast(*ip, fast) {
                        tracing::warn!(ip = %ip, error = %e, "cannot update the fast path");
                    }
                }
            }
        }
    }

    /// The fast path's connections never reach conntrack: those the change
    /// denies are dropped from its flows map (their pods have already lost
    /// the fast flag, so their next packets meet the rules). Returns how many.
    fn cut_fast_flows(
        &self,
        next: &Compiled,
        exposed: &std::collections::HashSet<IpAddr>,
    ) -> usize {
        let mut cut = 0;
        for net in &self.cfg.networks {
            let dir = self.cfg.cni_state_dir.join(net);
            let Ok(Some(instance)) = nodeplane_fastpath::Instance::find(&dir) else {
                continue;
            };
            let flows = match instance.flows() {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(network = %net, error = %e, "cannot list fast-path flows");
                    continue;
                }
            };
            for f in flows {
                let touched = exposed.contains(&f.src) || exposed.contains(&f.dst);
                if touched && !next.allows(f.src, f.dst, 6, f.dport) {
                    match instance.remove_flow(&f) {
                        Ok(()) => cut += 1,
                        Err(e) => tracing::warn!(error = %e, "fast-path flow not cut"),
                    }
                }
            }
        }
        cut
    }

    /// Ends the established connections the change just denied (the
    /// kernel's conntrack would otherwise keep them alive), then records
    /// that the revision's flows are cut too (`flowsRevision` in /status).
    fn cut_flows(&mut self, next: &Compiled) {
        let exposed = exposed_pods(self.applied.as_ref(), next);
        let mut cut = 0;
        if !exposed.is_empty() {
            match crate::conntrack::cut_denied(next, &exposed) {
                Ok(n) => cut = n,
                Err(e) => tracing::warn!(error = %e, "denied connections not cut"),
            }
            cut += self.cut_fast_flows(next, &exposed);
        }
        let mut st = self.status();
        st.conntrack_cut += cut as u64;
        st.flows_revision = st.revision.clone();
        if cut > 0 {
            tracing::info!(cut, generation = st.generation, "denied connections cut");
        }
    }
}

impl Agent {
    /// The clean-up after a change was put in force: empties the retired
    /// group chains into spares, deletes unused counters and tops up the
    /// spares (so the next change that needs a new group finds one).
    fn replenish(&mut self, settings: &Settings) {
        let Some((script, slots)) = nft::replenish(settings, &self.slots) else {
            return;
        };
        let Err(e) = nft::apply_script(&script) else {
            self.slots = slots;
            return;
        };
        // Part of it may be in the kernel (it can go as three
        // transactions), so retrying the same deletes could fail forever:
        // rewrite the table instead, which drops whatever is unused.
        tracing::warn!(error = %e, "retired group chains not emptied; rewriting the table");
        if let Some(applied) = &self.applied {
            // On failure the rules in force are still the change's (only
            // unused chains may be left); the next change's delta fails
            // on whatever is off and rewrites the table then.
            if let Err(e) = full_sync(settings, applied, &mut self.slots) {
                tracing::error!(error = %e, "table rewrite failed");
            }
        }
    }

    /// Leaves the node's pod CIDRs where nodeplane-cni looks for them when
    /// its configuration has no podCIDRs (so Node.spec.podCIDRs feeds IPAM,
    /// and the plugin keeps working from the file while the agent is down).
    fn publish_pod_cidrs(&self, settings: &Settings) {
        if settings.pod_cidrs.is_empty() {
            return;
        }
        let list: Vec<String> = settings.pod_cidrs.iter().map(|c| c.to_string()).collect();
        let json = serde_json::to_string(&list).unwrap_or_default();
        for net in &self.cfg.networks {
            let path = nodeplane_cni::config::pod_cidrs_file(&self.cfg.cni_state_dir, net);
            if std::fs::read_to_string(&path).is_ok_and(|old| old == json) {
                continue;
            }
            let tmp = path.with_extension("json.tmp");
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&tmp, &json))
                .and_then(|()| std::fs::rename(&tmp, &path));
            match written {
                Ok(()) => {
                    tracing::info!(path = %path.display(), cidrs = %json, "pod CIDRs published for the CNI plugin")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot publish pod CIDRs")
                }
            }
        }
    }
}

fn full_sync(settings: &Settings, next: &Compiled, slots: &mut nft::Slots) -> crate::Result<()> {
    let existing = nft::read_back(&settings.table)?;
    nft::apply(&nft::full(settings, &existing, next, slots))
}

/// Addresses of the local pods whose allowed traffic a change may have
/// narrowed: their group changed, its contents changed, or they are new
/// and isolated. Only their connections can need cutting; when there are
/// none, the conntrack table is not even read.
fn exposed_pods(prev: Option<&Compiled>, next: &Compiled) -> std::collections::HashSet<IpAddr> {
    let Some(prev) = prev else {
        return next
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
    };
    let before: BTreeMap<&AttachmentKey, &crate::policy::PodRules> =
        prev.pods.iter().map(|p| (&p.attachment, p)).collect();
    let narrowed = |old: Option<&String>, new: Option<&String>| match (old, new) {
        (_, None) => false, // not isolated any more: everything passes
        (None, Some(_)) => true,
        (Some(a), Some(b)) if a != b => true,
        (Some(_), Some(id)) => match (prev.groups.get(id), next.groups.get(id)) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
            _ => true,
        },
    };
    next.pods
        .iter()
        .filter(|p| match before.get(&p.attachment) {
            None => p.ingress.is_some() || p.egress.is_some(),
            Some(old) => {
                old.ips != p.ips
                    || narrowed(old.ingress.as_ref(), p.ingress.as_ref())
                    || narrowed(old.egress.as_ref(), p.egress.as_ref())
            }
        })
        .flat_map(|p| p.ips.iter().copied())
        .collect()
}
