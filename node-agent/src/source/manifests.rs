//! The manifests-directory source (standalone mode): every `*.yaml`,
//! `*.yml` and `*.json` file directly in one directory, each holding one or
//! more documents (`---`) of kind Pod, Namespace, NetworkPolicy, Node, or a
//! `List` of them. The directory is watched with inotify; the first read
//! is sent as a relist, then each change as the objects that came, changed
//! or went ([`DirState`]: files whose stamp did not change are not even
//! read), so the model ends up equal to the directory's contents,
//! deletions included.
//!
//! A directory that does not parse is not applied at all: the agent keeps
//! enforcing the last good one and logs the file, document and field at
//! fault. Half-applying a directory could open holes (a deny policy in a
//! broken file would silently vanish).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Event, Kind, Object, ObjectRef};
use crate::{Error, Result};

/// Parses multi-document YAML (or JSON) into objects. Unknown kinds are an
/// error naming the document, so a typo in `kind:` is not silently ignored.
pub fn parse_objects(yaml: &str) -> Result<Vec<Object>> {
    parse_in(Path::new("<input>"), yaml)
}

fn parse_in(path: &Path, text: &str) -> Result<Vec<Object>> {
    let err = |message: String| Error::Manifest {
        path: path.to_path_buf(),
        message,
    };
    // YAML 1.2 booleans only: under YAML 1.1 rules a namespace called `y`
    // or `n` would read as a boolean.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| err(format!("not valid YAML: {e}")))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        object_or_list(doc, &mut out)
            .map_err(|m| err(format!("document {} (counting from 1): {m}", i + 1)))?;
    }
    Ok(out)
}

fn object_or_list(doc: Value, out: &mut Vec<Object>) -> std::result::Result<(), String> {
    // Dapr documents (Component, Configuration, ...) share the directory;
    // the app runtime reads them (nodeplane_runtime::components).
    if doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|a| a.starts_with("dapr.io/"))
    {
        return Ok(());
    }
    // Core Secrets are the app runtime's (crate::secrets), not the model's.
    if crate::secrets::is_secret(&doc) {
        return Ok(());
    }
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("has no `kind` (expected Pod, Namespace, NetworkPolicy, Node or List)")?
        .to_string();
    let typed = |doc: Value| -> std::result::Result<Object, String> {
        fn de<T: serde::de::DeserializeOwned>(v: Value) -> std::result::Result<Box<T>, String> {
            serde_json::from_value(v)
                .map(Box::new)
                .map_err(|e| e.to_string())
        }
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            return Err(format!("{kind} has no metadata.name"));
        }
        let obj = match kind.as_str() {
            "Pod" => de(doc).map(Object::Pod),
            "Namespace" => de(doc).map(Object::Namespace),
            "NetworkPolicy" => de(doc).map(Object::NetworkPolicy),
            "Node" => de(doc).map(Object::Node),
            other => {
                return Err(format!(
                    "kind `{other}` is not one the agent reads (Pod, Namespace, NetworkPolicy, Node, List)"
                ))
            }
        };
        obj.map_err(|e| format!("{kind} {name}: {e}"))
    };
    if kind == "List" || kind.ends_with("List") {
        let items = match doc.get("items") {
            Some(Value::Array(items)) => items.clone(),
            _ => return Err(format!("{kind} without an `items` list")),
        };
        for item in items {
            if crate::secrets::is_secret(&item) {
                continue;
            }
            out.push(typed(item)?);
        }
    } else {
        out.push(typed(doc)?);
    }
    Ok(())
}

/// The files the source reads, sorted by name.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads and parses every manifest in `dir`; also returns the directory's
/// digest (see [`digest_dir`]) of exactly what was read.
pub fn load_dir(dir: &Path) -> Result<(Vec<Object>, String)> {
    let mut digest = Fnv::new();
    let mut objects = Vec::new();
    for path in manifest_files(dir)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        digest.file(&path, file_hash(&text));
        objects.extend(parse_in(&path, &text)?);
    }
    Ok((objects, digest.hex()))
}

/// What identifies a file's version without reading it: inode, size,
/// modification and change times (nanoseconds). Writers replace files by
/// rename (a new inode) or write them (a new mtime), so an equal stamp
/// means the same contents, as git's index assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        Ok(Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// One file's contents as last read: text, digest, parse, and where each
/// object key last occurs in the parse.
#[derive(Debug)]
struct FileState {
    text: String,
    hash: u64,
    objects: Vec<Object>,
    keys: HashMap<ObjectRef, usize>,
}

impl FileState {
    fn object(&self, key: &ObjectRef) -> Option<&Object> {
        self.keys.get(key).map(|&i| &self.objects[i])
    }
}

/// What the source knows of its directory between reads: each file's
/// stamp, text and parse. A change to one file of a large directory
/// re-reads only files whose stamp changed, re-parses only changed texts,
/// and compares only the objects of changed files.
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<PathBuf, (Stamp, Arc<FileState>)>,
    digest: Option<String>,
}

/// The object `key` resolves to across `files`: the last file (in name
/// order) that holds it wins, as in a relist.
fn winner<'a>(
    files: &'a BTreeMap<PathBuf, (Stamp, Arc<FileState>)>,
    key: &ObjectRef,
) -> Option<&'a Object> {
    files.values().rev().find_map(|(_, f)| f.object(key))
}

impl DirState {
    /// Re-reads `dir`. Returns None when nothing changed; else the events
    /// that bring a model from the previous read to this one: a relist
    /// the first time, then `Apply` for new or changed objects and `Delete`
    /// for objects that went (an object in two files: the later file
    /// wins, as in a relist), then the revision marker. A directory that
    /// does not parse is an error and leaves the state as it was.
    ///
    /// Why not a relist per change: the model would re-apply every object,
    /// and the agent could not program until the relist's end; a diff
    /// makes one changed pod one event.
    pub fn update(&mut self, dir: &Path) -> Result<Option<Vec<Event>>> {
        let mut digest = Fnv::new();
        let mut next: BTreeMap<PathBuf, (Stamp, Arc<FileState>)> = BTreeMap::new();
        let mut changed: Vec<PathBuf> = Vec::new();
        for path in manifest_files(dir)? {
            let stamp = Stamp::of(&path)?;
            let old = self.files.get(&path);
            let state = match old {
                Some((st, f)) if *st == stamp => f.clone(),
                _ => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                    match old {
                        // Rewritten with the same text: only the stamp is new.
                        Some((_, f)) if f.text == text => f.clone(),
                        _ => {
                            let objects = parse_in(&path, &text)?;
                            let keys = objects
                                .iter()
                                .enumerate()
                                .map(|(i, o)| (o.key(), i))
                                .collect();
                            changed.push(path.clone());
                            Arc::new(FileState {
                                hash: file_hash(&text),
                                text,
                                objects,
                                keys,
                            })
                        }
                    }
                }
            };
            digest.file(&path, state.hash);
            next.insert(path, (stamp, state));
        }
        changed.extend(
            self.files
                .keys()
                .filter(|p| !next.contains_key(*p))
                .cloned(),
        );
        let digest = digest.hex();
        if self.digest.as_ref() == Some(&digest) {
            self.files = next;
            return Ok(None);
        }
        let events = if self.digest.is_none() {
            let objects = next
                .values()
                .flat_map(|(_, f)| f.objects.iter().cloned())
                .collect();
            relist_events(objects, digest.clone())
        } else {
            // Only keys held by a changed file (before or after) can
            // resolve differently now.
            let mut keys: Vec<&ObjectRef> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for path in &changed {
                for (_, f) in [self.files.get(path), next.get(path)].into_iter().flatten() {
                    for k in f.keys.keys() {
                        if seen.insert(k) {
                            keys.push(k);
                        }
                    }
                }
            }
            let mut deletes = Vec::new();
            let mut applies = Vec::new();
            for k in keys {
                match (winner(&self.files, k), winner(&next, k)) {
                    (Some(_), None) => deletes.push(Event::Delete(k.clone())),
                    (None, Some(n)) => applies.push(Event::Apply(n.clone())),
                    (Some(o), Some(n)) if o != n => applies.push(Event::Apply(n.clone())),
                    _ => {}
                }
            }
            let mut events = deletes;
            events.append(&mut applies);
            events.push(Event::Revision(digest.clone()));
            events
        };
        self.files = next;
        self.digest = Some(digest);
        Ok(Some(events))
    }
}

/// A digest of the manifest files' names and contents. The agent reports
/// the digest of the directory it has put in force, so a caller that wrote
/// the directory can wait for exactly its version.
pub fn digest_dir(dir: &Path) -> Result<String> {
    let mut digest = Fnv::new();
    for path in manifest_files(dir)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        digest.file(&path, file_hash(&text));
    }
    Ok(digest.hex())
}

/// One file's contents digest (the directory digest combines these, so an
/// unchanged file need not be read again to compute it).
fn file_hash(text: &str) -> u64 {
    let mut h = Fnv::new();
    h.bytes(text.as_bytes());
    h.0
}

/// FNV-1a, 64 bit: not cryptographic; it only tells versions apart.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn file(&mut self, path: &Path, hash: u64) {
        let name = path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"");
        self.bytes(name);
        self.bytes(&[0]);
        self.bytes(&hash.to_le_bytes());
    }
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The events that replace everything the model holds with `objects`.
pub fn relist_events(objects: Vec<Object>, revision: String) -> Vec<Event> {
    let mut events: Vec<Event> = Kind::ALL.iter().map(|&k| Event::Reset(k)).collect();
    events.extend(objects.into_iter().map(Event::Apply));
    events.extend(Kind::ALL.iter().map(|&k| Event::Synced(k)));
    events.push(Event::Revision(revision));
    events
}

/// Watches `dir` and sends its contents as a relist at start, then each
/// change as single `Apply`/`Delete` events ([`DirState::update`]). Changes
/// that arrive within `settle` of each other are read once (an editor's
/// save is several inotify events); a file renamed into the directory is
/// complete (the way tools and Kubernetes' ConfigMap volumes write), so a
/// wake-up by renames alone is read at once. Returns when the receiver is
/// gone.
pub async fn run(dir: PathBuf, tx: mpsc::Sender<Event>, settle: Duration) -> Result<()> {
    // true: the event may be part of a write still going on.
    let (wake_tx, mut wake) = mpsc::unbounded_channel::<bool>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        use notify::event::{EventKind, ModifyKind};
        match res.map(|ev| ev.kind) {
            // Our own reads of the directory raise access events: reacting
            // to them would re-read forever.
            Ok(EventKind::Access(_)) => {}
            Ok(EventKind::Modify(ModifyKind::Name(_))) => {
                let _ = wake_tx.send(false);
            }
            _ => {
                let _ = wake_tx.send(true);
            }
        }
    })
    .map_err(|e| Error::Config(format!("cannot watch {}: {e}", dir.display())))?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| {
            Error::Config(format!(
                "cannot watch manifests directory {}: {e} (does it exist?)",
                dir.display()
            ))
        })?;
    let mut state = DirState::default();
    loop {
        match state.update(&dir) {
            Ok(Some(events)) => {
                tracing::info!(dir = %dir.display(), events = events.len(), "manifests loaded");
                for ev in events {
                    if tx.send(ev).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "manifests not applied; the last good set stays in force");
            }
        }
        let Some(mut partial) = wake.recv().await else {
            return Ok(());
        };
        while let Ok(p) = wake.try_recv() {
            partial |= p;
        }
        if partial {
            tokio::time::sleep(settle).await;
            while wake.try_recv().is_ok() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_lists() {
        let objs = parse_objects(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers: [{name: c, image: i, ports: [{name: http, containerPort: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1}, spec: {podCIDRs: [10.244.0.0/24]}}
"#,
        )
        .expect("parses");
        let kinds: Vec<Kind> = objs.iter().map(Object::kind).collect();
        assert_eq!(
            kinds,
            [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::Node]
        );
    }

    #[test]
    fn errors_name_the_document_and_problem() {
        let e = parse_objects(
            "kind: Namespace\nmetadata: {name: x}\n---\nkind: Deployment\nmetadata: {name: d}\n",
        )
        .expect_err("Deployment is not read");
        let m = e.to_string();
        assert!(m.contains("document 2") && m.contains("Deployment"), "{m}");
        let e = parse_objects("kind: Pod\nmetadata: {namespace: x}\n").expect_err("no name");
        assert!(e.to_string().contains("metadata.name"), "{e}");
        let e = parse_objects("kind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: 5}\n")
            .expect_err("wrong type");
        assert!(e.to_string().contains("NetworkPolicy p"), "{e}");
        let objs =
            parse_objects("kind: Pod\nmetadata: {name: c, namespace: y}\n").expect("y is a string");
        assert!(matches!(&objs[0], Object::Pod(p) if p.metadata.namespace.as_deref() == Some("y")));
        let e = parse_objects("a: [").expect_err("bad yaml");
        assert!(e.to_string().contains("not valid YAML"), "{e}");
    }

    #[test]
    fn a_changed_file_yields_only_its_changes() {
        let dir = std::env::temp_dir().join(format!("np-dirstate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let pod = |name: &str, app: &str| {
            format!("kind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: \"v{app}\"}}}}\n")
        };
        let write = |f: &str, docs: &[String]| {
            std::fs::write(dir.join(f), docs.join("---\n")).expect("write")
        };
        write("a.yaml", &[pod("a", "1"), pod("b", "1")]);
        write("c.yaml", &[pod("c", "1")]);
        let mut st = DirState::default();
        let first = st.update(&dir).expect("read").expect("events");
        assert!(
            matches!(first[0], Event::Reset(_)),
            "the first read is a relist"
        );
        assert!(st.update(&dir).expect("read").is_none(), "nothing changed");
        write("a.yaml", &[pod("a", "2")]);
        let ev = st.update(&dir).expect("read").expect("events");
        let names: Vec<String> = ev
            .iter()
            .map(|e| match e {
                Event::Apply(o) => format!("apply {}", o.key().name),
                Event::Delete(k) => format!("delete {}", k.name),
                Event::Revision(_) => "revision".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["delete b", "apply a", "revision"]);
        // A file that does not parse changes nothing, and is retried.
        std::fs::write(dir.join("c.yaml"), "kind: [").expect("write");
        assert!(st.update(&dir).is_err());
        write("c.yaml", &[pod("c", "1")]);
        assert!(
            st.update(&dir).expect("read").is_none(),
            "back to what was applied"
        );
        // The same pod in two files: the later file wins, so changing the
        // earlier copy changes nothing, and removing the later one applies
        // the earlier copy.
        write("d.yaml", &[pod("c", "9")]);
        let names = |ev: Vec<Event>| -> Vec<String> {
            ev.iter()
                .map(|e| match e {
                    Event::Apply(o) => format!("apply {}", o.key().name),
                    Event::Delete(k) => format!("delete {}", k.name),
                    Event::Revision(_) => "revision".into(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        let ev = st.update(&dir).expect("read").expect("events");
        assert_eq!(names(ev), ["apply c", "revision"]);
        write("c.yaml", &[pod("c", "5")]);
        let ev = st.update(&dir).expect("read").expect("events");
        assert_eq!(names(ev), ["revision"], "the earlier copy does not win");
        std::fs::remove_file(dir.join("d.yaml")).expect("rm");
        let ev = st.update(&dir).expect("read").expect("events");
        assert_eq!(names(ev), ["apply c", "revision"]);
        // Rewritten with the same text (a new stamp): nothing to do.
        write("c.yaml", &[pod("c", "5")]);
        assert!(st.update(&dir).expect("read").is_none(), "same text");
        // The digest the source reports is the one digest_dir computes.
        write("a.yaml", &[pod("a", "3")]);
        let ev = st.update(&dir).expect("read").expect("events");
        let want = digest_dir(&dir).expect("digest");
        assert!(
            matches!(ev.last(), Some(Event::Revision(r)) if *r == want),
            "{ev:?} vs {want}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
