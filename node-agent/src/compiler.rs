//! Incremental compilation of the model's policies for this node's pods.
//!
//! A pod's rules in one direction are fully determined by its *signature*:
//! the direction, the policies that select it (and isolate it that way),
//! and, for ingress when one of those policies names a port, the pod's own
//! named container ports. Pods with equal signatures share one rule group,
//! and the group is named after the signature, so the name survives any
//! change to the group's contents (a peer joining or leaving): the
//! datapath then updates elements in place instead of replacing the group.
//!
//! The [`Compiler`] caches each signature's compiled group. Per compile it
//! recomputes every local pod's signatures (cheap: selector checks against
//! the policies of the pod's namespace) but recompiles only the groups a
//! change can have touched:
//! - a policy added, changed or removed: the groups whose signature holds it;
//! - a pod whose labels, addresses or ports changed (before or after the
//!   change): the groups of every policy with a rule whose peers could
//!   match that pod ([`crate::policy::may_be_peer`]);
//! - a namespace change, or a very large batch: everything.
//!
//! Correctness does not depend on the cache: a from-scratch compile
//! ([`crate::policy::compile`]) gives the same rules, which the unit tests
//! check after every step of a sequence of changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::NetworkPolicySpec;

use crate::model::{Changes, Labels, Model, NamedPort, PodInfo, PodKey};
use crate::policy::{
    counter_name, group_cells, may_be_peer, named_ingress, selects, Book, Compiled, Dir, Fnv,
    Group, PodRules, Selecting,
};

/// More changed pods than this in one batch: recompile everything (cheaper
/// than checking each against every policy).
const FULL_ABOVE: usize = 200;

/// What shapes a group's contents.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Sig {
    dir: Dir,
    /// Indexes into the interned policy names, sorted.
    policies: Vec<usize>,
    /// The pod's named ports, when an ingress rule of these policies uses a
    /// named port; empty otherwise.
    ports: Vec<NamedPort>,
}

/// What the last compile did (for logs and the benchmark's breakdown).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompileStats {
    /// Groups taken from the cache.
    pub reused: usize,
    /// Groups compiled.
    pub compiled: usize,
    /// True when the cache was dropped first.
    pub full: bool,
}

/// Compiles incrementally; see the module documentation.
#[derive(Debug, Default)]
pub struct Compiler {
    /// Policy → its index in `names` (never reused, so cells keep meaning).
    interned: HashMap<PodKey, usize>,
    names: Vec<String>,
    cache: HashMap<Sig, (String, Arc<Group>)>,
    /// Pod → the addresses this node's attachments give it, as of the
    /// last compile (attachments are compared here, not tracked).
    attached: BTreeMap<PodKey, Vec<IpAddr>>,
    primed: bool,
    pub last: CompileStats,
}

impl Compiler {
    /// Compiles `model`. `changes` is what changed since the previous call
    /// ([`Model::take_changes`]); None recompiles everything.
    pub fn compile(&mut self, model: &Model, changes: Option<Changes>) -> Compiled {
        let attached = attached_ips(model);
        let full = match &changes {
            None => true,
            Some(ch) => !self.primed || ch.namespaces || ch.pods.len() > FULL_ABOVE,
        };
        for k in model.policies.keys() {
            self.intern(k);
        }
        if full {
            self.cache.clear();
        } else if let Some(ch) = changes {
            self.evict(model, ch, &attached);
        }
        self.attached = attached;
        self.primed = true;

        let book = Book::new(model);
        let specs: Vec<(&PodKey, &NetworkPolicySpec, usize)> = model
            .policies
            .iter()
            .map(|(k, s)| (k, s, self.interned[k]))
            .collect();
        let mut by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (k, _, _)) in specs.iter().enumerate() {
            by_ns.entry(k.0.as_str()).or_default().push(i);
        }
        let mut stats = CompileStats {
            full,
            ..CompileStats::default()
        };
        let mut out = Compiled {
            policies: self.names.clone(),
            counters: specs
                .iter()
                .map(|(k, _, i)| (self.names[*i].clone(), (*k).clone()))
                .collect(),
            ..Compiled::default()
        };
        let no_ports: Vec<NamedPort> = Vec::new();
        let no_labels = Labels::new();
        for a in model.attachments.values() {
            let (labels, ports) = match &a.pod {
                Some(k) => (
                    book.labels(k),
                    model.pods.get(k).map(|p| &p.ports).unwrap_or(&no_ports),
                ),
                None => (&no_labels, &no_ports),
            };
            // The policies of the pod's namespace that select it.
            let selecting: Vec<usize> = match &a.pod {
                None => Vec::new(),
                Some((ns, _)) => by_ns
                    .get(ns.as_str())
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|&i| {
                        specs[i]
                            .1
                            .pod_selector
                            .as_ref()
                            .is_none_or(|sel| selects(sel, labels))
                    })
                    .collect(),
            };
            let mut ids = [None, None];
            for (slot, dir) in [Dir::Ingress, Dir::Egress].into_iter().enumerate() {
                let applying: Vec<usize> = selecting
                    .iter()
                    .copied()
                    .filter(|&i| crate::policy::dir_rules(specs[i].1, dir).is_some())
                    .collect();
                if applying.is_empty() {
                    continue; // not isolated this way
                }
                let uses_ports =
                    dir == Dir::Ingress && applying.iter().any(|&i| named_ingress(specs[i].1));
                let mut policies: Vec<usize> = applying.iter().map(|&i| specs[i].2).collect();
                policies.sort_unstable();
                let sig = Sig {
                    dir,
                    policies,
                    ports: if uses_ports {
                        ports.clone()
                    } else {
                        Vec::new()
                    },
                };
                let (id, group) = match self.cache.get(&sig) {
                    Some(hit) => {
                        stats.reused += 1;
                        hit.clone()
                    }
                    None => {
                        stats.compiled += 1;
                        let selecting: Vec<Selecting<'_>> = applying
                            .iter()
                            .map(|&i| Selecting {
                                index: specs[i].2,
                                namespace: &specs[i].0 .0,
                                spec: specs[i].1,
                            })
                            .collect();
                        let g = Arc::new(group_cells(&book, dir, &selecting, ports));
                        let id = group_id(&sig, &self.names);
                        self.cache.insert(sig, (id.clone(), g.clone()));
                        (id, g)
                    }
                };
                out.groups.entry(id.clone()).or_insert(group);
                ids[slot] = Some(id);
            }
            let [ingress, egress] = ids;
            out.pods.push(PodRules {
                attachment: (a.network.clone(), a.container_id.clone(), a.ifname.clone()),
                pod: a.pod.clone(),
                host_ifname: a.host_ifname.clone(),
                ips: a.ips.clone(),
                ingress,
                egress,
            });
        }
        // Groups no pod uses any more would go stale unseen: drop them.
        self.cache.retain(|_, (id, _)| out.groups.contains_key(id));
        self.last = stats;
        out
    }

    fn intern(&mut self, k: &PodKey) -> usize {
        if let Some(&i) = self.interned.get(k) {
            return i;
        }
        let i = self.names.len();
        self.names.push(counter_name(&k.0, &k.1));
        self.interned.insert(k.clone(), i);
        i
    }

    /// Drops the cached groups `ch` (and changed attachments) can affect.
    fn evict(&mut self, model: &Model, ch: Changes, attached: &BTreeMap<PodKey, Vec<IpAddr>>) {
        let stale: HashSet<usize> = ch
            .policies
            .iter()
            .filter_map(|k| self.interned.get(k).copied())
            .collect();
        // Pods that changed, with their state before; a pod whose addresses
        // from attachments changed counts as changed too.
        let mut pods: BTreeMap<PodKey, Option<PodInfo>> = ch.pods;
        for k in self.attached.keys().chain(attached.keys()) {
            if self.attached.get(k) != attached.get(k) && !pods.contains_key(k) {
                pods.insert(k.clone(), model.pods.get(k).cloned());
            }
        }
        let mut stale_dir: HashSet<(Dir, usize)> = HashSet::new();
        for (key, before) in &pods {
            let old = PeerState::of(before.as_ref(), self.attached.get(key));
            let new = PeerState::of(model.pods.get(key), attached.get(key));
            if old.is_none() && new.is_none() {
                continue; // no address before or after: never a peer
            }
            // Same addresses and ports: only a change in whether a selector
            // matches can change a policy's entries.
            let same = match (&old, &new) {
                (Some(o), Some(n)) => o.addrs == n.addrs && o.ports == n.ports,
                _ => false,
            };
            let ns_labels = model.namespace_labels(&key.0);
            for (pk, spec) in &model.policies {
                let index = self.interned[pk];
                for dir in [Dir::Ingress, Dir::Egress] {
                    if stale_dir.contains(&(dir, index)) {
                        continue;
                    }
                    let matches = |s: &Option<PeerState<'_>>| {
                        s.as_ref().is_some_and(|s| {
                            may_be_peer(spec, &pk.0, dir, &key.0, s.labels, &ns_labels)
                        })
                    };
                    let (was, is) = (matches(&old), matches(&new));
                    if was != is || (is && !same) {
                        stale_dir.insert((dir, index));
                    }
                }
            }
        }
        self.cache.retain(|sig, _| {
            !sig.policies
                .iter()
                .any(|p| stale.contains(p) || stale_dir.contains(&(sig.dir, *p)))
        });
    }
}

/// A pod as a peer: what the group compile reads of it.
struct PeerState<'a> {
    labels: &'a Labels,
    addrs: Vec<IpAddr>,
    ports: &'a [NamedPort],
}

static NO_LABELS: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();

impl<'a> PeerState<'a> {
    /// None when the pod has no address (so it is no peer at all); the
    /// addresses are those [`Book`] gives it: the source's (unless host
    /// network) and this node's attachments'.
    fn of(info: Option<&'a PodInfo>, attached: Option<&Vec<IpAddr>>) -> Option<Self> {
        let mut addrs: Vec<IpAddr> = info
            .filter(|p| !p.host_network)
            .map(|p| p.ips.clone())
            .unwrap_or_default();
        addrs.extend(attached.into_iter().flatten().copied());
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return None;
        }
        Some(PeerState {
            labels: info.map_or_else(|| NO_LABELS.get_or_init(Labels::new), |p| &p.labels),
            addrs,
            ports: info.map(|p| p.ports.as_slice()).unwrap_or_default(),
        })
    }
}

/// Pod → addresses its attachments on this node carry.
fn attached_ips(model: &Model) -> BTreeMap<PodKey, Vec<IpAddr>> {
    let mut out: BTreeMap<PodKey, Vec<IpAddr>> = BTreeMap::new();
    for a in model.attachments.values() {
        if let Some(k) = &a.pod {
            let v = out.entry(k.clone()).or_default();
            v.extend(a.ips.iter().copied());
            v.sort();
            v.dedup();
        }
    }
    out
}

/// A group's name: a digest of its signature, with policies by counter
/// name (stable across agent restarts, unlike the indexes).
fn group_id(sig: &Sig, names: &[String]) -> String {
    let mut h = Fnv::new();
    let tag = match sig.dir {
        Dir::Ingress => "i",
        Dir::Egress => "e",
    };
    h.str(tag);
    for &p in &sig.policies {
        h.str(&names[p]);
        h.str(",");
    }
    h.str("|");
    for np in &sig.ports {
        h.str(&format!("{}/{}/{},", np.name, np.protocol, np.port));
    }
    format!("{tag}{:016x}", h.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attachment;
    use crate::source::{Event, Object};

    /// Rules with policies by name, so compiles with different index
    /// tables compare equal when they mean the same.
    type Normal = (
        Vec<(String, Option<String>, Option<String>)>,
        BTreeMap<String, Vec<String>>,
    );

    fn normal(c: &Compiled) -> Normal {
        let pods = c
            .pods
            .iter()
            .map(|p| (p.attachment.1.clone(), p.ingress.clone(), p.egress.clone()))
            .collect();
        let groups = c
            .groups
            .iter()
            .map(|(id, g)| {
                let mut cells: Vec<String> =
                    g.v4.iter()
                        .map(|x| {
                            format!(
                                "{:?}{:?}{:?}{}",
                                x.addr, x.proto, x.port, c.policies[x.policy]
                            )
                        })
                        .chain(g.v6.iter().map(|x| {
                            format!(
                                "{:?}{:?}{:?}{}",
                                x.addr, x.proto, x.port, c.policies[x.policy]
                            )
                        }))
                        .collect();
                cells.sort();
                (id.clone(), cells)
            })
            .collect();
        (pods, groups)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    const POLICIES: &[&str] = &[
        "{podSelector: {}, policyTypes: [Ingress]}",
        "{podSelector: {matchLabels: {app: a}}, ingress: [{from: [{podSelector: {matchLabels: {tier: web}}}], ports: [{port: 80}, {port: http}]}]}",
        "{podSelector: {matchLabels: {app: b}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: t1}}, podSelector: {matchLabels: {tier: api}}}]}]}",
        "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.8/29]}}], ports: [{protocol: UDP, port: 53}]}]}",
        "{podSelector: {matchExpressions: [{key: tier, operator: In, values: [web, db]}]}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}], ports: [{port: 8080, endPort: 8090}, {port: http}]}]}",
        "{podSelector: {matchLabels: {tier: api}}, policyTypes: [Egress], egress: [{ports: [{port: http}]}, {to: [{ipBlock: {cidr: 10.244.0.0/24}}], ports: [{port: http}]}]}",
        "{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [a]}]}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: t2}}}]}]}",
        "{podSelector: {matchExpressions: [{key: canary, operator: Exists}]}, ingress: [{}], egress: [{to: [{podSelector: {}}]}]}",
    ];

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: Option<u32>, http: u16) -> Object {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": http}]}]},
        });
        if let Some(ip) = ip {
            let ip = std::net::Ipv4Addr::from(0x0af4_0000 + ip).to_string();
            v["status"] = serde_json::json!({"podIPs": [{"ip": ip}]});
        }
        Object::Pod(Box::new(serde_json::from_value(v).expect("pod")))
    }

    fn policy(ns: &str, name: &str, spec: &str) -> Object {
        let yaml = format!(
            "kind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        );
        crate::source::manifests::parse_objects(&yaml)
            .expect("policy")
            .remove(0)
    }

    fn namespace(name: &str, team: &str) -> Object {
        let yaml =
            format!("kind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}}}\n");
        crate::source::manifests::parse_objects(&yaml)
            .expect("ns")
            .remove(0)
    }

    fn random_pod(r: &mut Rng, i: usize) -> Object {
        let ns = ["x", "y", "z"][i % 3];
        let app = ["a", "b", "c"][r.next(3)];
        let tier = ["web", "api", "db"][r.next(3)];
        let mut labels = vec![("app", app), ("tier", tier)];
        if r.next(4) == 0 {
            labels.push(("canary", "yes"));
        }
        let ip = (r.next(5) != 0).then(|| (i as u32) + 2 + 300 * r.next(2) as u32);
        pod(
            ns,
            &format!("p{i}"),
            &labels,
            ip,
            [80, 8080][r.next(2)] as u16,
        )
    }

    #[test]
    fn incremental_equals_from_scratch_over_random_changes() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let mut m = Model::new("n");
        for (n, t) in [("x", "t1"), ("y", "t2"), ("z", "t1")] {
            m.apply(Event::Apply(namespace(n, t)));
        }
        for i in 0..30 {
            m.apply(Event::Apply(random_pod(&mut r, i)));
        }
        for (i, spec) in POLICIES.iter().enumerate() {
            m.apply(Event::Apply(policy(
                ["x", "y", "z"][i % 3],
                &format!("np{i}"),
                spec,
            )));
        }
        for i in (0..30).step_by(2) {
            attach(&mut m, i);
        }
        let mut c = Compiler::default();
        let first = c.compile(&m, Some(m.clone().take_changes()));
        assert_eq!(normal(&first), normal(&crate::policy::compile(&m)));
        let _ = m.take_changes();
        let mut reused = 0;
        for step in 0..400 {
            match r.next(7) {
                0 | 1 => {
                    let i = r.next(30);
                    m.apply(Event::Apply(random_pod(&mut r, i)));
                }
                2 => {
                    let i = r.next(POLICIES.len());
                    let j = r.next(POLICIES.len());
                    m.apply(Event::Apply(policy(
                        ["x", "y", "z"][i % 3],
                        &format!("np{i}"),
                        POLICIES[j],
                    )));
                }
                3 => {
                    let i = r.next(POLICIES.len());
                    m.apply(Event::Delete(crate::source::ObjectRef {
                        kind: crate::source::Kind::NetworkPolicy,
                        namespace: ["x", "y", "z"][i % 3].into(),
                        name: format!("np{i}"),
                    }));
                }
                4 => {
                    let i = r.next(30);
                    if m.attachments.keys().any(|k| k.1 == format!("c{i}")) {
                        m.attachments.retain(|k, _| k.1 != format!("c{i}"));
                    } else {
                        attach(&mut m, i);
                    }
                }
                5 => {
                    let i = r.next(30);
                    m.apply(Event::Delete(crate::source::ObjectRef {
                        kind: crate::source::Kind::Pod,
                        namespace: ["x", "y", "z"][i % 3].into(),
                        name: format!("p{i}"),
                    }));
                }
                _ if r.next(4) == 0 => {
                    let n = ["x", "y", "z"][r.next(3)];
                    m.apply(Event::Apply(namespace(n, ["t1", "t2"][r.next(2)])));
                }
                _ => {}
            }
            let changes = m.take_changes();
            let inc = c.compile(&m, Some(changes));
            reused += c.last.reused;
            assert_eq!(
                normal(&inc),
                normal(&crate::policy::compile(&m)),
                "step {step}: incremental compile differs from a fresh one"
            );
        }
        assert!(reused > 0, "the cache was never used");
    }

    fn attach(m: &mut Model, i: usize) {
        let ns = ["x", "y", "z"][i % 3].to_string();
        let ip: IpAddr = std::net::Ipv4Addr::from(0x0af4_0000 + i as u32 + 2).into();
        let key = ("net".to_string(), format!("c{i}"), "eth0".to_string());
        m.attachments.insert(
            key,
            Attachment {
                network: "net".into(),
                container_id: format!("c{i}"),
                ifname: "eth0".into(),
                pod: Some((ns, format!("p{i}"))),
                host_ifname: format!("np{i}"),
                ips: vec![ip],
            },
        );
    }
}
