//! The Kubernetes API source (`source::kube`) against a test double of the
//! API server: an HTTP/1.1 server on 127.0.0.1 that answers the list and
//! watch requests kube-runtime's watcher makes, with a global
//! resourceVersion, an event history that watches resume from, compaction
//! (410 Gone for versions older than it, as an HTTP status or as a
//! WatchEvent ERROR), bookmarks, and watch streams it can end cleanly or cut.
//!
//! The events the source sends are applied to the real `Model`, and the
//! assertions are on the model and on the requests the double received.
//! The double also serves Dapr's `dapr.io/v1alpha1` Components and
//! Configurations and `dapr.io/v2alpha1` Subscriptions (or answers 404 for
//! them, as a cluster without the Dapr CRDs does) to `source::dapr`, whose output feeds a real app runtime's
//! component registry with real embedded stores in a temp dir.
//! Any request the double does not understand (path, method or query
//! parameter) is printed and makes the test fail.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeplane_agent::model::{Model, PodInfo};
use nodeplane_agent::source::{Event, Kind};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const NODE: &str = "node-1";
/// Upper bound for any one wait in these tests. A relist after a 410 waits
/// for the watcher's backoff (0.8 s to 1.6 s), so this is generous.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The API server double
// ---------------------------------------------------------------------------

/// The collections the source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Res {
    Pods,
    Namespaces,
    NetworkPolicies,
    Nodes,
    Components,
    Configurations,
    Subscriptions,
}

impl Res {
    /// What the policy source (`source::kube`) reads.
    const ALL: [Res; 4] = [Res::Pods, Res::Namespaces, Res::NetworkPolicies, Res::Nodes];
    /// What the app runtime's component source (`source::dapr`) reads.
    const DAPR: [Res; 3] = [Res::Components, Res::Configurations, Res::Subscriptions];

    fn every() -> impl Iterator<Item = Res> {
        Res::ALL.into_iter().chain(Res::DAPR)
    }

    fn path(self) -> &'static str {
        match self {
            Res::Pods => "/api/v1/pods",
            Res::Namespaces => "/api/v1/namespaces",
            Res::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Res::Nodes => "/api/v1/nodes",
            Res::Components => "/apis/dapr.io/v1alpha1/components",
            Res::Configurations => "/apis/dapr.io/v1alpha1/configurations",
            Res::Subscriptions => "/apis/dapr.io/v2alpha1/subscriptions",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Res::Pods => "Pod",
            Res::Namespaces => "Namespace",
            Res::NetworkPolicies => "NetworkPolicy",
            Res::Nodes => "Node",
            Res::Components => "Component",
            Res::Configurations => "Configuration",
            Res::Subscriptions => "Subscription",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::NetworkPolicies => "networking.k8s.io/v1",
            Res::Components | Res::Configurations => "dapr.io/v1alpha1",
            Res::Subscriptions => "dapr.io/v2alpha1",
            _ => "v1",
        }
    }

    fn from_path(path: &str) -> Option<Res> {
        Res::every().find(|r| r.path() == path)
    }

    fn of(obj: &Value) -> Res {
        let kind = obj["kind"].as_str().expect("test object without kind");
        Res::every()
            .find(|r| r.kind() == kind)
            .unwrap_or_else(|| panic!("test object of unknown kind {kind}"))
    }
}

/// One request as the double received it.
#[derive(Debug, Clone)]
struct Request {
    res: Res,
    query: BTreeMap<String, String>,
    /// The request line's target, for messages.
    target: String,
}

impl Request {
    fn is_watch(&self) -> bool {
        self.q("watch") == Some("true")
    }
    fn is_list(&self) -> bool {
        !self.is_watch()
    }
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
}

/// How a held watch stream is ended.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// The last chunk is sent, as the API server does at timeoutSeconds.
    Clean,
    /// The TCP connection is dropped mid-stream.
    Cut,
}

/// How a watch from a compacted resourceVersion is refused.
#[derive(Debug, Clone, Copy)]
enum Gone {
    /// HTTP 410 with a Status body.
    Http,
    /// HTTP 200, then a WatchEvent ERROR carrying a 410 Status, then the end.
    Event,
}

enum Chunk {
    Line(String),
    End(Close),
}

struct Watcher {
    res: Res,
    name: Option<String>,
    /// allowWatchBookmarks=true: the API server sends bookmarks only then.
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Chunk>,
}

struct Inner {
    /// The last resourceVersion handed out (one counter for all kinds, like
    /// etcd's revision).
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<(String, String), Value>>,
    /// (resourceVersion, collection, event type, object).
    history: Vec<(u64, Res, &'static str, Value)>,
    /// Watches from a version older than this are answered 410 Gone.
    compacted: u64,
    gone: Gone,
    watchers: Vec<Watcher>,
    /// Collections whose watch requests are parked until `release`.
    held: BTreeSet<Res>,
    parked: Vec<(Res, oneshot::Sender<()>)>,
    /// Lists to answer with this HTTP status, once each.
    fail_lists: Vec<(Res, u16)>,
    /// Collections not served (their CRD is not installed): 404 NotFound.
    absent: BTreeSet<Res>,
    requests: Vec<Request>,
    unknown: Vec<String>,
}

#[derive(Clone)]
struct ApiDouble {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every request, to wait for one.
    seen: Arc<watch::Sender<usize>>,
}

enum Reply {
    Json(u16, Value),
    Watch(mpsc::UnboundedReceiver<Chunk>),
    /// Not answered until the collection is released; then served again.
    Parked(oneshot::Receiver<()>),
}

impl ApiDouble {
    async fn start() -> ApiDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let double = ApiDouble {
            addr: listener.local_addr().expect("local addr"),
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                gone: Gone::Http,
                watchers: Vec::new(),
                held: BTreeSet::new(),
                parked: Vec::new(),
                fail_lists: Vec::new(),
                absent: BTreeSet::new(),
                requests: Vec::new(),
                unknown: Vec::new(),
            })),
            seen: Arc::new(watch::channel(0).0),
        };
        let d = double.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(d.clone().serve(stream));
            }
        });
        double
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("double's lock")
    }

    // --- what tests change -------------------------------------------------

    /// Creates or replaces an object (ADDED or MODIFIED to live watches).
    fn put(&self, mut obj: Value) -> u64 {
        let res = Res::of(&obj);
        let namespaced = !matches!(res, Res::Namespaces | Res::Nodes);
        if namespaced && obj["metadata"]["namespace"].is_null() {
            // As the API server does when an object is created without one.
            obj["metadata"]["namespace"] = json!("default");
        }
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&obj);
        let kind = match inner
            .objects
            .entry(res)
            .or_default()
            .insert(key, obj.clone())
        {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        inner.record(rv, res, kind, obj);
        rv
    }

    /// Deletes an object (DELETED to live watches).
    fn delete(&self, res: Res, namespace: &str, name: &str) -> u64 {
        let mut inner = self.lock();
        let key = (namespace.to_string(), name.to_string());
        let mut obj = inner
            .objects
            .entry(res)
            .or_default()
            .remove(&key)
            .unwrap_or_else(|| panic!("no {res:?} {namespace}/{name} to delete"));
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.record(rv, res, "DELETED", obj);
        rv
    }

    /// Sends a BOOKMARK at the current resourceVersion to live watches of `res`.
    fn bookmark(&self, res: Res) -> u64 {
        let inner = self.lock();
        let line = event_line(
            "BOOKMARK",
            &json!({
                "kind": res.kind(),
                "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": inner.rv.to_string()},
            }),
        );
        let mut sent = 0;
        for w in inner
            .watchers
            .iter()
            .filter(|w| w.res == res && w.bookmarks)
        {
            if w.tx.send(Chunk::Line(line.clone())).is_ok() {
                sent += 1;
            }
        }
        assert!(sent > 0, "no live {res:?} watch that asked for bookmarks");
        inner.rv
    }

    /// Ends the live watches of `res`, and parks its next watch requests
    /// until `release`.
    fn hold(&self, res: Res, close: Close) {
        let mut inner = self.lock();
        inner.held.insert(res);
        inner.watchers.retain(|w| {
            if w.res == res {
                let _ = w.tx.send(Chunk::End(close));
                false
            } else {
                true
            }
        });
    }

    /// Answers the parked watch requests of `res`, and those to come.
    fn release(&self, res: Res) {
        let mut inner = self.lock();
        inner.held.remove(&res);
        let parked = std::mem::take(&mut inner.parked);
        for (r, tx) in parked {
            if r == res {
                let _ = tx.send(());
            } else {
                inner.parked.push((r, tx));
            }
        }
    }

    /// Forgets the event history: a watch from an older resourceVersion
    /// than the current one is answered 410 Gone, as `gone` says.
    fn compact(&self, gone: Gone) {
        let mut inner = self.lock();
        inner.compacted = inner.rv;
        inner.gone = gone;
        inner.history.clear();
    }

    /// Whether `res` is served (its CRD installed). Not served, its lists
    /// and watches are answered 404 NotFound, as the API server does for a
    /// resource it does not know; its objects are kept for when it is.
    fn serve_collection(&self, res: Res, served: bool) {
        let mut inner = self.lock();
        if served {
            inner.absent.remove(&res);
        } else {
            inner.absent.insert(res);
        }
    }

    /// The next list of `res` is answered with `status`.
    fn fail_next_list(&self, res: Res, status: u16) {
        self.lock().fail_lists.push((res, status));
    }

    // --- what tests look at ------------------------------------------------

    fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    fn lists(&self, res: Res) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.res == res && r.is_list())
            .count()
    }

    fn watches(&self, res: Res) -> Vec<Request> {
        let all = self.requests();
        all.into_iter()
            .filter(|r| r.res == res && r.is_watch())
            .collect()
    }

    /// Waits for the `n`th (from 1) watch request of `res`.
    async fn nth_watch(&self, res: Res, n: usize) -> Request {
        self.wait_request(&format!("watch request {n} of {res:?}"), |_| {
            self.watches(res).len() >= n
        })
        .await;
        self.watches(res).swap_remove(n - 1)
    }

    fn assert_no_unknown_requests(&self) {
        let unknown = self.lock().unknown.clone();
        assert!(
            unknown.is_empty(),
            "the double got requests it does not understand: {unknown:#?}"
        );
    }

    /// Waits for a request that `pred` accepts, in the whole log.
    async fn wait_request(&self, what: &str, pred: impl Fn(&Request) -> bool) -> Request {
        let mut seen = self.seen.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(r) = self.requests().into_iter().find(&pred) {
                    return r;
                }
                seen.changed().await.expect("double gone");
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}; requests: {:#?}",
                self.requests()
            )
        })
    }

    // --- the server --------------------------------------------------------

    async fn serve(self, stream: TcpStream) {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        // HTTP/1.1 keep-alive: one request after another on the connection.
        loop {
            let mut line = String::new();
            match rd.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let request_line = line.trim_end().to_string();
            let mut content_length = 0usize;
            loop {
                let mut header = String::new();
                if rd.read_line(&mut header).await.unwrap_or(0) == 0 {
                    return;
                }
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        content_length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; content_length];
            if rd.read_exact(&mut body).await.is_err() {
                return;
            }
            let mut reply = self.answer(&request_line, true);
            while let Reply::Parked(released) = reply {
                if released.await.is_err() {
                    return;
                }
                reply = self.answer(&request_line, false);
            }
            let ok = match reply {
                Reply::Json(status, body) => write_json(&mut wr, status, &body).await,
                Reply::Watch(chunks) => match stream_watch(&mut wr, chunks).await {
                    Some(Close::Clean) => true,
                    Some(Close::Cut) | None => return,
                },
                Reply::Parked(_) => unreachable!("served above"),
            };
            if !ok {
                return;
            }
        }
    }

    /// Answers one request; `log` is false when a parked request is served
    /// after its release (it was logged when it came).
    fn answer(&self, request_line: &str, log: bool) -> Reply {
        let mut inner = self.lock();
        let reply = inner.answer(request_line, log);
        drop(inner);
        if log {
            self.seen.send_modify(|n| *n += 1);
        }
        reply
    }
}

impl Inner {
    fn record(&mut self, rv: u64, res: Res, kind: &'static str, obj: Value) {
        let line = event_line(kind, &obj);
        let name = obj["metadata"]["name"].as_str().map(str::to_string);
        self.watchers.retain(|w| {
            if w.res != res || (w.name.is_some() && w.name != name) {
                return true;
            }
            w.tx.send(Chunk::Line(line.clone())).is_ok()
        });
        self.history.push((rv, res, kind, obj));
    }

    fn unknown(&mut self, what: String) -> Reply {
        eprintln!("API DOUBLE: UNKNOWN REQUEST: {what}");
        self.unknown.push(what.clone());
        Reply::Json(
            404,
            status_json(
                404,
                "NotFound",
                &format!("the double does not serve {what}"),
            ),
        )
    }

    fn answer(&mut self, request_line: &str, log: bool) -> Reply {
        let mut parts = request_line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));
        let Some(res) = Res::from_path(path) else {
            return self.unknown(request_line.to_string());
        };
        if method != "GET" {
            return self.unknown(request_line.to_string());
        }
        let query: BTreeMap<String, String> = raw_query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        let request = Request {
            res,
            query,
            target: target.to_string(),
        };
        if log {
            self.requests.push(request.clone());
        }
        let watch = request.is_watch();
        let known: &[&str] = if watch {
            &[
                "watch",
                "timeoutSeconds",
                "allowWatchBookmarks",
                "resourceVersion",
                "fieldSelector",
            ]
        } else {
            &["limit", "fieldSelector"]
        };
        if let Some(k) = request.query.keys().find(|k| !known.contains(&k.as_str())) {
            return self.unknown(format!("{target}: query parameter {k}"));
        }
        // Only this selector is served (and only on nodes, where the source uses it).
        let name = match request.q("fieldSelector") {
            None => None,
            Some(sel) => match sel.strip_prefix("metadata.name=") {
                Some(name) if res == Res::Nodes => Some(name.to_string()),
                _ => return self.unknown(format!("{target}: fieldSelector {sel}")),
            },
        };
        let selected =
            |obj: &Value| name.is_none() || obj["metadata"]["name"].as_str() == name.as_deref();
        if self.absent.contains(&res) {
            return Reply::Json(
                404,
                status_json(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }

        if !watch {
            if let Some(i) = self.fail_lists.iter().position(|(r, _)| *r == res) {
                let (_, status) = self.fail_lists.remove(i);
                return Reply::Json(
                    status,
                    status_json(status, "InternalError", "the double was told to fail"),
                );
            }
            let limit: usize = request
                .q("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(usize::MAX);
            let items: Vec<Value> = self
                .objects
                .get(&res)
                .into_iter()
                .flat_map(|m| m.values())
                .filter(|o| selected(o))
                .map(|o| {
                    // List items carry no kind or apiVersion.
                    let mut o = o.clone();
                    let m = o.as_object_mut().expect("object");
                    m.remove("kind");
                    m.remove("apiVersion");
                    o
                })
                .collect();
            assert!(items.len() <= limit, "the double does not paginate");
            return Reply::Json(
                200,
                json!({
                    "kind": format!("{}List", res.kind()),
                    "apiVersion": res.api_version(),
                    "metadata": {"resourceVersion": self.rv.to_string()},
                    "items": items,
                }),
            );
        }

        let Some(from) = request
            .q("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return self.unknown(format!("{target}: watch without a numeric resourceVersion"));
        };
        if self.held.contains(&res) {
            let (tx, rx) = oneshot::channel();
            self.parked.push((res, tx));
            return Reply::Parked(rx);
        }
        if from < self.compacted {
            let message = format!("too old resource version: {from} ({})", self.compacted);
            let status = status_json(410, "Expired", &message);
            return match self.gone {
                Gone::Http => Reply::Json(410, status),
                Gone::Event => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let _ = tx.send(Chunk::Line(event_line("ERROR", &status)));
                    let _ = tx.send(Chunk::End(Close::Clean));
                    Reply::Watch(rx)
                }
            };
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (rv, r, kind, obj) in &self.history {
            if *r == res && *rv > from && selected(obj) {
                let _ = tx.send(Chunk::Line(event_line(kind, obj)));
            }
        }
        let bookmarks = request.q("allowWatchBookmarks") == Some("true");
        self.watchers.push(Watcher {
            res,
            name,
            bookmarks,
            tx,
        });
        Reply::Watch(rx)
    }
}

async fn write_json(wr: &mut (impl AsyncWriteExt + Unpin), status: u16, body: &Value) -> bool {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        reason(status),
        body.len()
    );
    wr.write_all(head.as_bytes()).await.is_ok() && wr.write_all(body.as_bytes()).await.is_ok()
}

/// Streams a watch response in chunked encoding, one event per chunk.
/// `Some(Clean)` when the last chunk was sent (the connection can serve
/// another request), otherwise the connection is to be dropped.
async fn stream_watch(
    wr: &mut (impl AsyncWriteExt + Unpin),
    mut chunks: mpsc::UnboundedReceiver<Chunk>,
) -> Option<Close> {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    wr.write_all(head.as_bytes()).await.ok()?;
    loop {
        match chunks.recv().await {
            Some(Chunk::Line(line)) => {
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                wr.write_all(chunk.as_bytes()).await.ok()?;
            }
            Some(Chunk::End(Close::Clean)) | None => {
                wr.write_all(b"0\r\n\r\n").await.ok()?;
                return Some(Close::Clean);
            }
            Some(Chunk::End(Close::Cut)) => return Some(Close::Cut),
        }
    }
}

fn event_line(kind: &str, obj: &Value) -> String {
    format!("{}\n", json!({"type": kind, "object": obj}))
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        _ => "Whatever",
    }
}

fn key_of(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&meta["namespace"]), s(&meta["name"]))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
                continue;
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// The source under test, feeding the real model
// ---------------------------------------------------------------------------

struct Agent {
    rx: mpsc::Receiver<Event>,
    model: Model,
    /// Every event received, in order.
    events: Vec<Event>,
    task: JoinHandle<nodeplane_agent::Result<()>>,
}

impl Agent {
    async fn start(d: &ApiDouble) -> Agent {
        // The source's warnings (and kube's, with RUST_LOG) in the output of
        // a failing test.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let client = nodeplane_agent::source::kube::client_from_url(&d.url())
            .await
            .expect("client for the double");
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(nodeplane_agent::source::kube::run(client, NODE.into(), tx));
        Agent {
            rx,
            model: Model::new(NODE),
            events: Vec::new(),
            task,
        }
    }

    /// Applies events until `pred` holds for the model.
    async fn until(&mut self, what: &str, pred: impl Fn(&Model) -> bool) {
        let (rx, model, events) = (&mut self.rx, &mut self.model, &mut self.events);
        let done = tokio::time::timeout(WAIT, async {
            while !pred(model) {
                let event = rx.recv().await.expect("the source closed its channel");
                events.push(event.clone());
                model.apply(event);
            }
        })
        .await;
        if done.is_err() {
            panic!(
                "timed out waiting for {what}\nmodel: {:#?}\nevents: {:#?}",
                self.model, self.events
            );
        }
    }

    async fn synced(&mut self) {
        self.until("the initial sync", Model::is_synced).await;
    }

    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }

    fn resets(&self, kind: Kind) -> usize {
        self.count(|e| matches!(e, Event::Reset(k) if *k == kind))
    }
}

/// Bounds a whole test, so a hang fails with a message instead of CI's timeout.
async fn bounded(test: impl Future<Output = ()>) {
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .unwrap_or_else(|_| panic!("test still running after {:?}", started.elapsed()));
}

// ---------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------

fn namespace(name: &str, labels: Value) -> Value {
    json!({
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": {"name": name, "labels": labels, "uid": format!("uid-ns-{name}")},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn pod(namespace: &str, name: &str, labels: Value, node: &str, ips: &[&str]) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": namespace, "labels": labels,
            "uid": format!("uid-pod-{namespace}-{name}"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app", "image": "busybox",
                "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"containerPort": 9090},
                ],
            }],
        },
        "status": {
            "phase": "Running",
            "podIP": ips.first(),
            "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        },
    })
}

fn policy(namespace: &str, name: &str, selector: Value) -> Value {
    json!({
        "kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                "ports": [{"protocol": "TCP", "port": "http"}],
            }],
        },
    })
}

fn node(name: &str, cidrs: &[&str]) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]},
    })
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("test IP")
}

fn pod_names(m: &Model) -> Vec<String> {
    m.pods
        .keys()
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect()
}

/// A small cluster: two namespaces, two pods, a policy, this node and another.
fn seed(d: &ApiDouble) {
    d.put(namespace("web", json!({"team": "a"})));
    d.put(namespace("default", json!({})));
    d.put(pod(
        "web",
        "a",
        json!({"app": "frontend"}),
        NODE,
        &["10.244.1.5"],
    ));
    d.put(pod(
        "web",
        "b",
        json!({"app": "backend"}),
        NODE,
        &["10.244.1.6", "fd00:1::6"],
    ));
    d.put(policy("web", "backend", json!({"app": "backend"})));
    d.put(node(NODE, &["10.244.1.0/24", "fd00:1::/64"]));
    d.put(node("node-2", &["10.244.2.0/24"]));
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// (a) The first list of each kind fills the model, and the requests are
/// the ones kube-runtime's watcher is documented to make.
#[tokio::test]
async fn initial_list_of_all_kinds_syncs_the_model() {
    bounded(async {
        let d = ApiDouble::start().await;
        seed(&d);
        d.put(pod(
            "kube-system",
            "host",
            json!({"k8s-app": "proxy"}),
            "node-2",
            &["192.168.0.2"],
        ));
        let list_rv = d.lock().rv;
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        let m = &agent.model;

        assert_eq!(
            m.namespaces,
            BTreeMap::from([
                ("default".into(), labels(&[])),
                ("web".into(), labels(&[("team", "a")]))
            ])
        );
        assert_eq!(pod_names(m), ["kube-system/host", "web/a", "web/b"]);
        let b = &m.pods[&("web".to_string(), "b".to_string())];
        assert_eq!(
            *b,
            PodInfo {
                labels: labels(&[("app", "backend")]),
                node_name: Some(NODE.into()),
                ips: vec![ip("10.244.1.6"), ip("fd00:1::6")],
                host_network: false,
                ports: vec![nodeplane_agent::model::NamedPort {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: 8080,
                }],
            }
        );
        let spec = &m.policies[&("web".to_string(), "backend".to_string())];
        assert_eq!(
            serde_json::to_value(spec).expect("spec as JSON"),
            policy("web", "backend", json!({"app": "backend"}))["spec"]
        );
        assert_eq!(m.node_pod_cidrs, ["10.244.1.0/24", "fd00:1::/64"]);

        // Each kind: Reset, its objects, Synced, in that order.
        for kind in Kind::ALL {
            let mine: Vec<&Event> = agent
                .events
                .iter()
                .filter(|e| match e {
                    Event::Reset(k) | Event::Synced(k) => *k == kind,
                    Event::Apply(o) => o.kind() == kind,
                    Event::Delete(r) => r.kind == kind,
                    Event::Revision(_) => false,
                })
                .collect();
            assert!(
                matches!(mine.first(), Some(Event::Reset(_))),
                "{kind:?}: {mine:?}"
            );
            assert!(
                matches!(mine.last(), Some(Event::Synced(_))),
                "{kind:?}: {mine:?}"
            );
        }

        // One list per kind: a page of up to 500, most recent (no
        // resourceVersion), this node only by field selector; then a watch
        // from the list's resourceVersion, with bookmarks.
        for res in Res::ALL {
            let w = d
                .wait_request(&format!("the {res:?} watch"), |r| {
                    r.res == res && r.is_watch()
                })
                .await;
            let lists: Vec<Request> = d
                .requests()
                .into_iter()
                .filter(|r| r.res == res && r.is_list())
                .collect();
            assert_eq!(lists.len(), 1, "{lists:?}");
            let l = &lists[0];
            assert_eq!(l.q("limit"), Some("500"), "{}", l.target);
            assert_eq!(l.q("resourceVersion"), None, "{}", l.target);
            assert_eq!(w.q("allowWatchBookmarks"), Some("true"), "{}", w.target);
            assert_eq!(w.q("timeoutSeconds"), Some("290"), "{}", w.target);
            assert_eq!(
                w.q("resourceVersion"),
                Some(list_rv.to_string().as_str()),
                "{}",
                w.target
            );
            assert_eq!(w.q("sendInitialEvents"), None, "{}", w.target);
            let selector = (res == Res::Nodes).then_some("metadata.name=node-1");
            assert_eq!(l.q("fieldSelector"), selector, "{}", l.target);
            assert_eq!(w.q("fieldSelector"), selector, "{}", w.target);
        }
        d.assert_no_unknown_requests();
    })
    .await;
}

/// (b) ADDED, MODIFIED and DELETED on each kind's watch reach the model.
#[tokio::test]
async fn watch_events_change_the_model() {
    bounded(async {
        let d = ApiDouble::start().await;
        seed(&d);
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        for res in Res::ALL {
            d.wait_request("the watches", |r| r.res == res && r.is_watch())
                .await;
        }
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());

        d.put(pod("web", "c", json!({"app": "db"}), NODE, &["10.244.1.7"]));
        agent
            .until("pod c added", |m| m.pods.contains_key(&key("web", "c")))
            .await;
        d.put(pod(
            "web",
            "a",
            json!({"app": "frontend", "v": "2"}),
            NODE,
            &["10.244.1.5"],
        ));
        agent
            .until("pod a relabelled", |m| {
                m.pods[&key("web", "a")].labels.contains_key("v")
            })
            .await;
        d.delete(Res::Pods, "web", "b");
        agent
            .until("pod b deleted", |m| !m.pods.contains_key(&key("web", "b")))
            .await;
        assert_eq!(pod_names(&agent.model), ["web/a", "web/c"]);

        d.put(namespace("db", json!({"team": "b"})));
        agent
            .until("namespace db added", |m| m.namespaces.contains_key("db"))
            .await;
        d.put(namespace("web", json!({"team": "c"})));
        agent
            .until("namespace web relabelled", |m| {
                m.namespaces["web"] == labels(&[("team", "c")])
            })
            .await;
        d.delete(Res::Namespaces, "", "db");
        agent
            .until("namespace db deleted", |m| !m.namespaces.contains_key("db"))
            .await;

        d.put(policy("web", "db", json!({"app": "db"})));
        agent
            .until("policy db added", |m| {
                m.policies.contains_key(&key("web", "db"))
            })
            .await;
        d.put(policy("web", "db", json!({"app": "db", "tier": "1"})));
        agent
            .until("policy db changed", |m| {
                m.policies[&key("web", "db")]
                    .pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    == Some(&labels(&[("app", "db"), ("tier", "1")]))
            })
            .await;
        d.delete(Res::NetworkPolicies, "web", "db");
        agent
            .until("policy db deleted", |m| {
                !m.policies.contains_key(&key("web", "db"))
            })
            .await;

        d.put(node(NODE, &["10.244.9.0/24"]));
        agent
            .until("node CIDR changed", |m| {
                m.node_pod_cidrs == ["10.244.9.0/24"]
            })
            .await;
        d.delete(Res::Nodes, "", NODE);
        agent
            .until("node deleted", |m| m.node_pod_cidrs.is_empty())
            .await;

        for res in Res::ALL {
            assert_eq!(d.lists(res), 1, "{res:?} was relisted");
        }
        for kind in Kind::ALL {
            assert_eq!(agent.resets(kind), 1, "{kind:?}");
        }
        d.assert_no_unknown_requests();
    })
    .await;
}

/// (c) A BOOKMARK changes nothing in the model, but the next watch resumes
/// from its resourceVersion (here moved on by changes to other kinds).
#[tokio::test]
async fn bookmarks_move_the_resume_point() {
    bounded(async {
        let d = ApiDouble::start().await;
        seed(&d);
        let list_rv = d.lock().rv.to_string();
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        for res in [Res::Pods, Res::Nodes] {
            d.wait_request("the first watch", |r| r.res == res && r.is_watch())
                .await;
        }
        let before = agent.model.clone();

        // Other kinds move the global resourceVersion on.
        d.put(namespace("db", json!({})));
        d.put(policy("web", "db", json!({"app": "db"})));
        agent
            .until("the other kinds' changes", |m| m.policies.len() == 2)
            .await;

        for res in [Res::Pods, Res::Nodes] {
            let mark = d.bookmark(res).to_string();
            assert_ne!(mark, list_rv);
            d.hold(res, Close::Clean);
            let resumed = d
                .wait_request(&format!("a {res:?} watch from the bookmark"), |r| {
                    r.res == res && r.is_watch() && r.q("resourceVersion") != Some(list_rv.as_str())
                })
                .await;
            assert_eq!(
                resumed.q("resourceVersion"),
                Some(mark.as_str()),
                "{}",
                resumed.target
            );
            d.release(res);
        }
        // The resumed watch works.
        d.put(pod("web", "c", json!({}), NODE, &["10.244.1.7"]));
        agent.until("pod c", |m| m.pods.len() == 3).await;

        // The bookmarks changed nothing.
        assert_eq!(pod_names(&agent.model), ["web/a", "web/b", "web/c"]);
        assert_eq!(agent.model.node_pod_cidrs, before.node_pod_cidrs);
        for res in Res::ALL {
            assert_eq!(d.lists(res), 1, "{res:?} was relisted");
        }
        assert_eq!(agent.resets(Kind::Pod), 1);
        assert_eq!(agent.resets(Kind::Node), 1);
        d.assert_no_unknown_requests();
    })
    .await;
}

/// (d) The server forgets history while the pods watch is away; the
/// resumed watch is refused with 410 Gone, and the source relists. A pod
/// deleted in the forgotten window (its DELETED event is lost) leaves the
/// model at the end of the relist; one added in it appears.
async fn expired_resource_version_relists(gone: Gone) {
    let d = ApiDouble::start().await;
    seed(&d);
    let mut agent = Agent::start(&d).await;
    agent.synced().await;
    let first = d.nth_watch(Res::Pods, 1).await;

    d.hold(Res::Pods, Close::Clean);
    let resumed = d.nth_watch(Res::Pods, 2).await;
    assert_eq!(resumed.q("resourceVersion"), first.q("resourceVersion"));
    d.delete(Res::Pods, "web", "a");
    d.put(pod("web", "c", json!({}), NODE, &["10.244.1.7"]));
    d.compact(gone);
    let after = d.lock().rv.to_string();
    d.release(Res::Pods);

    agent
        .until("the relist without pod a", |m| {
            pod_names(m) == ["web/b", "web/c"] && m.is_synced()
        })
        .await;
    assert_eq!(d.lists(Res::Pods), 2, "pods are listed again");
    assert_eq!(agent.resets(Kind::Pod), 2);
    // Then the watch goes on from the new list.
    let rewatch = d
        .wait_request("the watch after the relist", |r| {
            r.res == Res::Pods && r.is_watch() && r.q("resourceVersion") == Some(after.as_str())
        })
        .await;
    assert_eq!(rewatch.q("allowWatchBookmarks"), Some("true"));
    d.put(pod("web", "d", json!({}), NODE, &["10.244.1.8"]));
    agent.until("pod d", |m| m.pods.len() == 3).await;
    for res in [Res::Namespaces, Res::NetworkPolicies, Res::Nodes] {
        assert_eq!(d.lists(res), 1, "{res:?} was relisted");
    }
    d.assert_no_unknown_requests();
}

#[tokio::test]
async fn http_410_on_watch_relists() {
    bounded(expired_resource_version_relists(Gone::Http)).await;
}

#[tokio::test]
async fn watch_event_error_410_relists() {
    bounded(expired_resource_version_relists(Gone::Event)).await;
}

/// (e) The server ends the watch (timeoutSeconds, an API server restart, a
/// cut connection): the source watches again from the last version it saw,
/// receives what happened meanwhile, and does not list again.
async fn closed_watch_resumes_without_relist(close: Close) {
    let d = ApiDouble::start().await;
    seed(&d);
    let mut agent = Agent::start(&d).await;
    agent.synced().await;
    let first = d.nth_watch(Res::Pods, 1).await;

    d.hold(Res::Pods, close);
    let resumed = d.nth_watch(Res::Pods, 2).await;
    assert_eq!(resumed.q("resourceVersion"), first.q("resourceVersion"));
    // Meanwhile: one pod changes, one goes, one comes.
    d.put(pod(
        "web",
        "a",
        json!({"app": "frontend", "v": "2"}),
        NODE,
        &["10.244.1.5"],
    ));
    d.delete(Res::Pods, "web", "b");
    let last = d
        .put(pod("web", "c", json!({}), NODE, &["10.244.1.7"]))
        .to_string();
    d.release(Res::Pods);
    agent
        .until("the changes made while away", |m| {
            pod_names(m) == ["web/a", "web/c"]
                && m.pods[&("web".to_string(), "a".to_string())]
                    .labels
                    .contains_key("v")
        })
        .await;

    // Again, now from the version of the last event received.
    d.hold(Res::Pods, close);
    let third = d.nth_watch(Res::Pods, 3).await;
    assert_eq!(
        third.q("resourceVersion"),
        Some(last.as_str()),
        "{}",
        third.target
    );
    d.release(Res::Pods);
    d.put(pod("web", "d", json!({}), NODE, &["10.244.1.8"]));
    agent.until("pod d", |m| m.pods.len() == 3).await;

    assert_eq!(d.lists(Res::Pods), 1, "pods were listed again");
    assert_eq!(agent.resets(Kind::Pod), 1);
    d.assert_no_unknown_requests();
}

#[tokio::test]
async fn cleanly_ended_watch_resumes_without_relist() {
    bounded(closed_watch_resumes_without_relist(Close::Clean)).await;
}

#[tokio::test]
async fn cut_watch_connection_resumes_without_relist() {
    bounded(closed_watch_resumes_without_relist(Close::Cut)).await;
}

/// A failing list is retried (after the watcher's backoff), not fatal.
#[tokio::test]
async fn failed_list_is_retried() {
    bounded(async {
        let d = ApiDouble::start().await;
        seed(&d);
        d.fail_next_list(Res::Namespaces, 500);
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        assert_eq!(d.lists(Res::Namespaces), 2);
        assert_eq!(agent.model.namespaces.len(), 2);
        assert!(!agent.task.is_finished());
        d.assert_no_unknown_requests();
    })
    .await;
}

/// `run` returns once the receiver is gone, even with nothing to send.
#[tokio::test]
async fn run_returns_when_the_receiver_is_dropped() {
    bounded(async {
        let d = ApiDouble::start().await;
        seed(&d);
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        for res in Res::ALL {
            d.wait_request("the watches", |r| r.res == res && r.is_watch())
                .await;
        }
        let Agent { rx, task, .. } = agent;
        drop(rx);
        let result = tokio::time::timeout(WAIT, task)
            .await
            .expect("run still running after its receiver was dropped")
            .expect("run panicked");
        assert!(result.is_ok(), "{result:?}");
    })
    .await;
}

#[tokio::test]
async fn bad_url_and_empty_node_name_are_errors() {
    use nodeplane_agent::source::kube::{client_from_url, run};
    assert!(client_from_url("not a url").await.is_err());
    let d = ApiDouble::start().await;
    let client = client_from_url(&d.url()).await.expect("client");
    let (tx, _rx) = mpsc::channel(1);
    assert!(run(client, String::new(), tx).await.is_err());
}

/// The same cluster, described as manifests.
const CLUSTER_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: web
  labels: {team: a, env: prod}
---
apiVersion: v1
kind: Namespace
metadata:
  name: empty
---
apiVersion: v1
kind: Pod
metadata:
  name: frontend
  namespace: web
  labels: {app: frontend}
spec:
  nodeName: node-1
  containers:
  - name: app
    image: busybox
    ports:
    - {name: http, containerPort: 8080}
    - {name: dns, containerPort: 53, protocol: UDP}
  initContainers:
  - name: init
    image: busybox
    ports:
    - {name: admin, containerPort: 9000}
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00:1::5"}]
---
apiVersion: v1
kind: Pod
metadata:
  name: no-namespace
  labels: {app: default-app}
spec:
  nodeName: node-2
  containers: [{name: app, image: busybox}]
status:
  phase: Running
  podIP: 10.244.2.9
---
apiVersion: v1
kind: Pod
metadata:
  name: done
  namespace: web
spec:
  containers: [{name: app, image: busybox}]
  restartPolicy: Never
status:
  phase: Succeeded
  podIP: 10.244.1.99
---
apiVersion: v1
kind: Pod
metadata:
  name: hostnet
  namespace: kube-system
spec:
  hostNetwork: true
  nodeName: node-1
  containers: [{name: app, image: busybox}]
status:
  phase: Running
  podIP: 192.168.0.1
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend
  namespace: web
spec:
  podSelector:
    matchExpressions:
    - {key: app, operator: In, values: [backend, db]}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {app: frontend}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {protocol: TCP, port: http}
    - {port: 5000, endPort: 5100}
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{protocol: UDP, port: 53}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: default
spec:
  podSelector: {}
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24, "fd00:1::/64"]
---
apiVersion: v1
kind: Node
metadata:
  name: node-2
spec:
  podCIDR: 10.244.2.0/24
"#;

/// The cluster after some changes.
const CLUSTER_YAML_CHANGED: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: web
  labels: {team: b}
---
apiVersion: v1
kind: Pod
metadata:
  name: frontend
  namespace: web
  labels: {app: frontend, version: "2"}
spec:
  nodeName: node-1
  containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 8081}]}]
status:
  phase: Running
  podIP: 10.244.1.6
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: default
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
spec:
  podCIDRs: [10.244.7.0/24]
"#;

fn yaml_docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).expect("test YAML")
}

/// What the manifests source sends for one read of its directory.
fn manifests_relist(model: &mut Model, yaml: &str) {
    let objects = nodeplane_agent::source::manifests::parse_objects(yaml).expect("manifests parse");
    for kind in Kind::ALL {
        model.apply(Event::Reset(kind));
    }
    for obj in objects {
        model.apply(Event::Apply(obj));
    }
    for kind in Kind::ALL {
        model.apply(Event::Synced(kind));
    }
}

/// The Kubernetes API source and the manifests source build equal models
/// from the same objects: first the initial state, then after changes (the
/// API side through watch events, the manifests side through a re-read).
#[tokio::test]
async fn kube_and_manifests_sources_build_the_same_model() {
    bounded(async {
        let mut from_manifests = Model::new(NODE);
        manifests_relist(&mut from_manifests, CLUSTER_YAML);
        assert!(from_manifests.is_synced());
        assert_eq!(from_manifests.pods.len(), 4);
        assert_eq!(from_manifests.policies.len(), 2);

        let d = ApiDouble::start().await;
        for doc in yaml_docs(CLUSTER_YAML) {
            d.put(doc);
        }
        let mut agent = Agent::start(&d).await;
        agent.synced().await;
        assert_eq!(agent.model, from_manifests, "after the initial list");

        // Changes: relabel a namespace and delete another, change a pod and
        // delete three, change a policy and delete another, change this node.
        manifests_relist(&mut from_manifests, CLUSTER_YAML_CHANGED);
        for doc in yaml_docs(CLUSTER_YAML_CHANGED) {
            d.put(doc);
        }
        d.delete(Res::Namespaces, "", "empty");
        d.delete(Res::Pods, "default", "no-namespace");
        d.delete(Res::Pods, "web", "done");
        d.delete(Res::Pods, "kube-system", "hostnet");
        d.delete(Res::NetworkPolicies, "web", "backend");
        d.delete(Res::Nodes, "", "node-2");
        let expected = from_manifests.clone();
        agent.until("the same changes", |m| *m == expected).await;
        assert_eq!(agent.model.pods.len(), 1);
        d.assert_no_unknown_requests();
    })
    .await;
}

// ---------------------------------------------------------------------------
// The app runtime's components from the API (source::dapr)
// ---------------------------------------------------------------------------

use nodeplane_runtime::components::{ApiComponents, KeyPrefix, Registry, StateComponent};
use nodeplane_runtime::Runtime;

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "np-kube-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `source::dapr` against the double, feeding a real runtime (no
/// listeners: its registry, readiness and problems are what is checked).
struct Components {
    rt: Arc<Runtime>,
    state: TempDir,
    task: JoinHandle<()>,
}

impl Components {
    /// Starts the source and the runtime's component reader, and returns
    /// once the runtime is ready (as the agent's start does).
    async fn start(d: &ApiDouble) -> Components {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let client = nodeplane_agent::source::kube::client_from_url(&d.url())
            .await
            .expect("client for the double");
        let (tx, rx) = watch::channel(ApiComponents::default());
        let task = tokio::spawn(nodeplane_agent::source::dapr::run(client, tx));
        let state = TempDir::new("components");
        let (_directory, directory) = watch::channel(Arc::new(Default::default()));
        let rt = Runtime::new(
            nodeplane_runtime::Options {
                components_dir: None,
                state_dir: state.0.join("runtime"),
                invoke_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(1),
            },
            directory,
            None,
            None,
        );
        tokio::time::timeout(
            WAIT,
            rt.start_components(Duration::from_millis(20), Some(rx)),
        )
        .await
        .expect("the runtime's first component read did not finish");
        assert!(rt.is_ready());
        Components { rt, state, task }
    }

    fn registry(&self) -> Arc<Registry> {
        self.rt.registry()
    }

    /// Waits until `pred` holds for the registry.
    async fn until(&self, what: &str, pred: impl Fn(&Registry) -> bool) -> Arc<Registry> {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let reg = self.registry();
                if pred(&reg) {
                    return reg;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}\nregistry: {:#?}\nproblems: {:?}",
                self.registry(),
                self.rt.problems()
            )
        })
    }

    /// Waits until the problems are as `pred` wants.
    async fn until_problems(&self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let done = tokio::time::timeout(WAIT, async {
            while !pred(&self.rt.problems()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if done.is_err() {
            panic!(
                "timed out waiting for {what}; problems: {:?}",
                self.rt.problems()
            );
        }
    }
}

fn component(namespace: &str, name: &str, metadata: Value) -> Value {
    json!({
        "kind": "Component", "apiVersion": "dapr.io/v1alpha1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "state.embedded", "version": "v1", "metadata": metadata},
    })
}

fn configuration(namespace: &str, name: &str, default_action: &str) -> Value {
    json!({
        "kind": "Configuration", "apiVersion": "dapr.io/v1alpha1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessControl": {
            "defaultAction": default_action,
            "policies": [{
                "appId": "front", "namespace": namespace,
                "operations": [{"name": "/orders/*", "httpVerb": ["GET"], "action": "allow"}],
            }],
        }},
    })
}

/// A Subscription of the app id `b` in `namespace` to `orders` on `pubsub`.
fn subscription(namespace: &str, name: &str, route: &str) -> Value {
    json!({
        "kind": "Subscription", "apiVersion": "dapr.io/v2alpha1",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pubsubname": "pubsub", "topic": "orders", "routes": {"default": route}},
        "scopes": ["b"],
    })
}

/// How a problem for a collection the API server does not serve starts.
fn crd_absent(res: Res) -> String {
    let plural = res.path().rsplit('/').next().expect("a plural");
    format!(
        "{} {plural}: not served by the API server",
        res.api_version()
    )
}

fn store_names(reg: &Registry) -> Vec<&str> {
    reg.stores.keys().map(String::as_str).collect()
}

fn store<'r>(reg: &'r Registry, name: &str) -> &'r StateComponent {
    reg.stores
        .get(name)
        .unwrap_or_else(|| panic!("no store {name} in {reg:#?}"))
}

/// The initial list of Components and Configurations becomes the
/// runtime's registry: a real embedded store for the Component, in its
/// namespace only, and the Configuration's access control.
#[tokio::test]
async fn dapr_initial_list_builds_the_registry() {
    bounded(async {
        let d = ApiDouble::start().await;
        d.put(component(
            "shop",
            "cache",
            json!([{"name": "keyPrefix", "value": "none"}]),
        ));
        d.put(configuration("shop", "acl", "deny"));
        let c = Components::start(&d).await;
        let reg = c.registry();
        assert!(reg.errors.is_empty(), "{:?}", reg.errors);
        assert!(c.rt.problems().is_empty(), "{:?}", c.rt.problems());
        assert_eq!(store_names(&reg), ["shop/cache", "statestore"]);
        let cache = store(&reg, "shop/cache");
        assert_eq!(cache.spec.kind, "state.embedded");
        assert_eq!(cache.key_prefix, KeyPrefix::None);
        assert_eq!(cache.namespace.as_deref(), Some("shop"));
        assert!(cache.visible_to(Some("orders"), Some("shop")));
        assert!(!cache.visible_to(Some("orders"), Some("default")));
        assert!(
            c.state
                .0
                .join("runtime/namespaces/shop/cache.redb")
                .is_file(),
            "the embedded store's file"
        );
        assert!(c.rt.outbound_ready().await, "every store answers a ping");

        use nodeplane_runtime::acl::{Action, CallerId};
        let acl = &reg.configs["shop/acl"];
        let front = CallerId {
            app_id: Some("front"),
            namespace: Some("shop"),
        };
        assert_eq!(acl.decide(front, "GET", "orders/1"), Action::Allow);
        assert_eq!(acl.decide(front, "POST", "orders/1"), Action::Deny);

        // A list, then a watch from its resourceVersion, per collection.
        for res in Res::DAPR {
            let w = d
                .wait_request(&format!("the {res:?} watch"), |r| {
                    r.res == res && r.is_watch()
                })
                .await;
            assert_eq!(d.lists(res), 1);
            assert_eq!(w.q("allowWatchBookmarks"), Some("true"), "{}", w.target);
        }
        for res in Res::ALL {
            assert_eq!(d.lists(res), 0, "{res:?}: not this source's");
        }
        assert!(!c.task.is_finished());
        d.assert_no_unknown_requests();
    })
    .await;
}

/// Watch ADDED, MODIFIED and DELETED change the registry: a store appears,
/// a change that leaves the spec alone keeps the open store, a spec change
/// reopens it, a delete removes it; the same for a Configuration.
#[tokio::test]
async fn dapr_watch_events_change_the_registry() {
    bounded(async {
        let d = ApiDouble::start().await;
        let c = Components::start(&d).await;
        assert_eq!(store_names(&c.registry()), ["statestore"]);
        for res in Res::DAPR {
            d.wait_request("the watches", |r| r.res == res && r.is_watch())
                .await;
        }

        d.put(component("shop", "cache", json!([])));
        let added = c
            .until("cache added", |r| r.stores.contains_key("shop/cache"))
            .await;
        assert_eq!(
            store(&added, "shop/cache").namespace.as_deref(),
            Some("shop")
        );
        assert_eq!(store(&added, "shop/cache").key_prefix, KeyPrefix::AppId);

        // MODIFIED with the same spec (a label, say): the store stays open.
        let mut relabelled = component("shop", "cache", json!([]));
        relabelled["metadata"]["labels"] = json!({"team": "a"});
        d.put(relabelled);
        let kept = c
            .until("the relabelled cache read", |r| {
                !std::ptr::eq(r, &*added) && r.stores.contains_key("shop/cache")
            })
            .await;
        assert!(Arc::ptr_eq(
            &store(&added, "shop/cache").store,
            &store(&kept, "shop/cache").store
        ));

        // A spec change reopens it (the same embedded file, so the old
        // store must be closed first: nothing here may hold it).
        let old = Arc::downgrade(&store(&kept, "shop/cache").store);
        drop((added, kept));
        d.put(component(
            "shop",
            "cache",
            json!([{"name": "keyPrefix", "value": "name"}]),
        ));
        let changed = c
            .until("cache's new keyPrefix", |r| {
                r.stores
                    .get("shop/cache")
                    .is_some_and(|s| s.key_prefix == KeyPrefix::Name)
            })
            .await;
        assert!(changed.errors.is_empty(), "{:?}", changed.errors);
        assert!(old.upgrade().is_none(), "the old store was closed");
        drop(changed);

        d.put(configuration("shop", "acl", "deny"));
        c.until("acl added", |r| r.configs.contains_key("shop/acl"))
            .await;
        d.put(configuration("shop", "acl", "allow"));
        c.until("acl changed", |r| {
            r.configs
                .get("shop/acl")
                .is_some_and(|a| a.default_action == nodeplane_runtime::acl::Action::Allow)
        })
        .await;

        d.delete(Res::Components, "shop", "cache");
        d.delete(Res::Configurations, "shop", "acl");
        let gone = c
            .until("cache and acl deleted", |r| {
                !r.stores.contains_key("shop/cache") && r.configs.is_empty()
            })
            .await;
        assert_eq!(store_names(&gone), ["statestore"]);
        assert!(c.rt.outbound_ready().await);
        for res in Res::DAPR {
            assert_eq!(d.lists(res), 1, "{res:?} was relisted");
        }
        d.assert_no_unknown_requests();
    })
    .await;
}

/// Without the CRDs the runtime is ready anyway, with the default store
/// and a problem naming the missing resource; once the API serves them
/// the components arrive and the problem clears.
#[tokio::test]
async fn dapr_crds_absent_then_installed() {
    bounded(async {
        let d = ApiDouble::start().await;
        for res in Res::DAPR {
            d.serve_collection(res, false);
        }
        d.put(component("shop", "cache", json!([])));
        let c = Components::start(&d).await;
        assert_eq!(store_names(&c.registry()), ["statestore"]);
        assert!(c.rt.outbound_ready().await);
        let problems = c.rt.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for (p, res) in problems.iter().zip(Res::DAPR) {
            assert!(
                p.starts_with(&crd_absent(res)) && p.contains("deploy/daemonset/dapr-crds.yaml"),
                "{p}"
            );
        }

        // The CRDs are installed: the next retry lists them.
        for res in Res::DAPR {
            d.serve_collection(res, true);
        }
        c.until("cache arrives", |r| r.stores.contains_key("shop/cache"))
            .await;
        c.until_problems("the problems to clear", <[String]>::is_empty)
            .await;
        for res in Res::DAPR {
            assert!(d.lists(res) >= 2, "{res:?} was listed again");
        }
        assert!(!c.task.is_finished());
        d.assert_no_unknown_requests();
    })
    .await;
}

/// A list that fails for a passing reason (a 500) makes the runtime ready
/// but without the default store: the cluster may define its own
/// `statestore`, and writes to the embedded one would go to the wrong
/// store. The retried list brings the components and the default.
#[tokio::test]
async fn dapr_failed_list_holds_back_the_default_store() {
    bounded(async {
        let d = ApiDouble::start().await;
        d.fail_next_list(Res::Components, 500);
        d.put(component("shop", "cache", json!([])));
        let c = Components::start(&d).await;
        let reg = c.registry();
        if !reg.stores.contains_key("shop/cache") {
            // Ready before the retry: nothing, not even the default.
            assert!(reg.stores.is_empty(), "{:?}", reg.stores.keys());
            assert!(
                reg.errors.iter().any(|e| e.contains("held back")),
                "{:?}",
                reg.errors
            );
        }
        let reg = c
            .until("the retried list", |r| r.stores.contains_key("shop/cache"))
            .await;
        assert_eq!(store_names(&reg), ["shop/cache", "statestore"]);
        assert!(
            !reg.errors.iter().any(|e| e.contains("held back")),
            "{:?}",
            reg.errors
        );
        assert!(d.lists(Res::Components) >= 2);
        d.assert_no_unknown_requests();
    })
    .await;
}

/// The Components watch's resourceVersion expires while it is away; the
/// relist drops a Component deleted meanwhile and brings one added.
async fn dapr_expired_resource_version_relists(gone: Gone) {
    let d = ApiDouble::start().await;
    d.put(component("shop", "a", json!([])));
    d.put(component("shop", "b", json!([])));
    let c = Components::start(&d).await;
    assert_eq!(
        store_names(&c.registry()),
        ["shop/a", "shop/b", "statestore"]
    );
    d.nth_watch(Res::Components, 1).await;

    d.hold(Res::Components, Close::Clean);
    d.nth_watch(Res::Components, 2).await;
    d.delete(Res::Components, "shop", "b");
    d.put(component("default", "c", json!([])));
    d.compact(gone);
    d.release(Res::Components);

    let reg = c
        .until("the relist without b", |r| {
            store_names(r) == ["default/c", "shop/a", "statestore"]
        })
        .await;
    assert_eq!(
        store(&reg, "default/c").namespace.as_deref(),
        Some("default")
    );
    assert_eq!(d.lists(Res::Components), 2, "components are listed again");
    assert_eq!(d.lists(Res::Configurations), 1);
    d.assert_no_unknown_requests();
}

#[tokio::test]
async fn dapr_http_410_on_watch_relists() {
    bounded(dapr_expired_resource_version_relists(Gone::Http)).await;
}

#[tokio::test]
async fn dapr_watch_event_error_410_relists() {
    bounded(dapr_expired_resource_version_relists(Gone::Event)).await;
}

/// A Subscription from the API is in the runtime's registry after the
/// initial list, as its namespace and scopes say; a MODIFIED changes it
/// and a DELETED removes it.
#[tokio::test]
async fn dapr_subscriptions_follow_the_api() {
    bounded(async {
        let d = ApiDouble::start().await;
        d.put(subscription("shop", "orders", "/orders"));
        let c = Components::start(&d).await;
        let reg = c.registry();
        assert!(reg.errors.is_empty(), "{:?}", reg.errors);
        assert!(c.rt.problems().is_empty(), "{:?}", c.rt.problems());
        assert_eq!(reg.subscriptions.len(), 1, "{:?}", reg.subscriptions);
        let s = &reg.subscriptions[0];
        assert_eq!(s.name, "orders");
        assert_eq!(s.namespace.as_deref(), Some("shop"));
        assert_eq!(s.scopes, ["b"]);
        assert_eq!(s.spec.pubsub, "pubsub");
        assert_eq!(s.spec.topic, "orders");
        assert_eq!(s.spec.routes.default.as_deref(), Some("/orders"));
        assert!(s.applies_to("b", "shop"));
        assert!(!s.applies_to("a", "shop"), "scopes: b only");
        assert!(!s.applies_to("b", "default"), "shop's only");
        drop(reg);

        d.wait_request("the Subscriptions watch", |r| {
            r.res == Res::Subscriptions && r.is_watch()
        })
        .await;
        d.put(subscription("shop", "orders", "/orders/v2"));
        let reg = c
            .until("the changed route", |r| {
                r.subscriptions.len() == 1
                    && r.subscriptions[0].spec.routes.default.as_deref() == Some("/orders/v2")
            })
            .await;
        assert!(reg.errors.is_empty(), "{:?}", reg.errors);
        drop(reg);

        d.delete(Res::Subscriptions, "shop", "orders");
        c.until("the Subscription deleted", |r| r.subscriptions.is_empty())
            .await;
        assert_eq!(
            d.lists(Res::Subscriptions),
            1,
            "Subscriptions were relisted"
        );
        assert!(!c.task.is_finished());
        d.assert_no_unknown_requests();
    })
    .await;
}

/// Without the Subscription CRD (the other two installed) the runtime is
/// ready with its components and the default store, not held back, and
/// reports the missing resource; once it is served the Subscription
/// arrives and the problem clears.
#[tokio::test]
async fn dapr_subscription_crd_absent_holds_nothing_back() {
    bounded(async {
        let d = ApiDouble::start().await;
        d.serve_collection(Res::Subscriptions, false);
        d.put(component("shop", "cache", json!([])));
        d.put(subscription("shop", "orders", "/orders"));
        let c = Components::start(&d).await;
        let reg = c.registry();
        assert_eq!(store_names(&reg), ["shop/cache", "statestore"]);
        assert!(reg.pubsubs.contains_key("pubsub"), "the default pub/sub");
        assert!(reg.subscriptions.is_empty(), "{:?}", reg.subscriptions);
        assert!(
            !reg.errors.iter().any(|e| e.contains("held back")),
            "{:?}",
            reg.errors
        );
        assert!(c.rt.outbound_ready().await);
        let problems = c.rt.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&crd_absent(Res::Subscriptions))
                && problems[0].contains("deploy/daemonset/dapr-crds.yaml"),
            "{problems:?}"
        );
        drop(reg);

        d.serve_collection(Res::Subscriptions, true);
        c.until("the Subscription arrives", |r| {
            r.subscriptions.iter().any(|s| s.name == "orders")
        })
        .await;
        c.until_problems("the problem to clear", <[String]>::is_empty)
            .await;
        assert!(d.lists(Res::Subscriptions) >= 2);
        assert_eq!(d.lists(Res::Components), 1);
        d.assert_no_unknown_requests();
    })
    .await;
}
