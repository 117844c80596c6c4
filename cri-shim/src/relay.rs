//! The h2 relay (`--relay h2`, and the frame relay's fallback while
//! containerd is unreachable), and the hook logic both relays share
//! ([`Relay::prepare`], [`Relay::complete`]). Here every gRPC call the
//! kubelet makes is forwarded to the runtime
//! by its path, headers (metadata, grpc-timeout) and body frames as they
//! are, and the runtime's headers, frames and trailers come back the same
//! way. Only the seven lifecycle methods are read, to tell the agent, and
//! CreateContainer is the only one changed (see [`crate::inject`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use k8s_cri::v1 as cri;
use nodeplane_proto::agent::pod_lifecycle::Kind;
use prost::Message;

use crate::body::{self, Body};
use crate::config::Config;
use crate::deliver::Hooks;
use crate::grpc;
use crate::inject;
use crate::metrics::Metrics;
use crate::pods::{Pod, Pods};
use crate::unary::Unary;
use crate::upstream::Upstream;

/// Largest hooked request or answer read whole (the kubelet's own limit
/// for CRI messages is 16 MiB).
const MAX_MESSAGE: usize = 16 << 20;

const RUNTIME: &str = "/runtime.v1.RuntimeService/";

/// Longest the READY event holds the hook queue while its sandbox status
/// is read (the status call's own deadline is 10 s).
pub(crate) const STATUS_HOLD: Duration = Duration::from_secs(11);

/// What READY needs from a verbose PodSandboxStatus.
#[derive(Debug, Default)]
pub(crate) struct SandboxStatus {
    pub ready: bool,
    pub netns: String,
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hooked {
    RunPodSandbox,
    StopPodSandbox,
    RemovePodSandbox,
    CreateContainer,
    StartContainer,
    StopContainer,
    RemoveContainer,
}

impl Hooked {
    fn of(path: &str) -> Option<Self> {
        Some(match path.strip_prefix(RUNTIME)? {
            "RunPodSandbox" => Hooked::RunPodSandbox,
            "StopPodSandbox" => Hooked::StopPodSandbox,
            "RemovePodSandbox" => Hooked::RemovePodSandbox,
            "CreateContainer" => Hooked::CreateContainer,
            "StartContainer" => Hooked::StartContainer,
            "StopContainer" => Hooked::StopContainer,
            "RemoveContainer" => Hooked::RemoveContainer,
            _ => return None,
        })
    }
}

/// What a hooked call does with the runtime's successful answer.
pub(crate) type After = Box<dyn FnOnce(&Relay, &[u8]) + Send>;

/// A hooked call between its request and its answer.
#[derive(Default)]
pub(crate) struct Prepared {
    /// CreateContainer's request with the injections, framed.
    pub(crate) body: Option<bytes::Bytes>,
    after: Option<After>,
    /// RunPodSandbox's pod, to report a failed attempt.
    starting: Option<Pod>,
}

#[derive(Debug)]
pub struct Relay {
    cfg: Config,
    upstream: Arc<Upstream>,
    unary: Unary,
    hooks: Option<Arc<Hooks>>,
    pub(crate) pods: Pods,
    pub metrics: Arc<Metrics>,
}

/// A call's answer before it goes back to the client.
struct Answer {
    response: Response<Body>,
    shim_error: bool,
}

impl Relay {
    pub fn new(cfg: Config, hooks: Option<Arc<Hooks>>) -> Self {
        Relay {
            upstream: Arc::new(Upstream::new(&cfg.runtime, cfg.runtime_connections)),
            unary: Unary::new(&cfg.runtime, cfg.runtime_connections),
            cfg,
            hooks,
            pods: Pods::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Handles one call from the kubelet. Never fails: problems become a
    /// gRPC status naming them.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        // A clone of the URI shares its bytes: no copy of the path per call.
        let uri = req.uri().clone();
        let path = uri.path();
        let hooked = self.hook_of(path);
        let answer = match hooked {
            None if crate::metrics::is_unary(path) => self.forward_buffered(req).await,
            None => self.forward(req.map(Body::Stream)).await,
            Some(h) => self.hooked(h, req, start).await,
        };
        self.metrics.call(path, start.elapsed(), answer.shim_error);
        answer.response
    }

    /// Whether kubelet connections get the frame relay ([`crate::frames`]).
    pub(crate) fn frames(&self) -> bool {
        self.cfg.frames
    }

    pub(crate) fn runtime_path(&self) -> &std::path::Path {
        &self.cfg.runtime
    }

    /// The lifecycle method `path` names, if this shim reads it: without
    /// an agent only an injecting CreateContainer needs reading.
    pub(crate) fn hook_of(&self, path: &str) -> Option<Hooked> {
        Hooked::of(path).filter(|h| {
            self.hooks.is_some() || (*h == Hooked::CreateContainer && self.cfg.inject.is_some())
        })
    }

    /// Sends a call to the runtime as it is.
    async fn forward(&self, req: Request<Body>) -> Answer {
        match self.send(req).await {
            Ok(r) => Answer {
                response: r.map(Body::Stream),
                shim_error: false,
            },
            Err(e) => self.unavailable(e),
        }
    }

    /// A unary CRI v1 call, stored and forwarded whole: the same bytes,
    /// headers and trailers, but each side gets its message in one write
    /// instead of one per frame (fewer wake-ups of the kubelet and of
    /// containerd per call). Streams and unknown methods never come here.
    async fn forward_buffered(&self, req: Request<Incoming>) -> Answer {
        let (parts, incoming) = req.into_parts();
        let request = match body::collect_chunks(incoming, MAX_MESSAGE).await {
            Ok(b) => b,
            Err(e) => {
                return Self::shim_status(
                    grpc::INVALID_ARGUMENT,
                    format!("reading the request body: {e}"),
                )
            }
        };
        let mut parts = parts;
        if let Err(e) = absolute(&mut parts.uri) {
            return self.unavailable(e);
        }
        match self
            .unary
            .call(Request::from_parts(parts, request), MAX_MESSAGE)
            .await
        {
            Ok(r) => Answer {
                response: r.map(Body::chunks),
                shim_error: false,
            },
            Err(crate::Error::Malformed { reason, .. }) => Self::shim_status(
                grpc::INTERNAL,
                format!("reading the runtime's answer: {reason}"),
            ),
            Err(e) => self.unavailable(e),
        }
    }

    async fn send(&self, req: Request<Body>) -> crate::Result<Response<Incoming>> {
        send(&self.upstream, req).await
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> Answer {
        tracing::warn!(error = %e, "call not relayed");
        Answer {
            response: grpc::status_response(
                grpc::UNAVAILABLE,
                &format!("nodeplane-cri-shim: {e}"),
                Body::empty(),
            ),
            shim_error: true,
        }
    }

    fn shim_status(code: u32, msg: String) -> Answer {
        Answer {
            response: grpc::status_response(
                code,
                &format!("nodeplane-cri-shim: {msg}"),
                Body::empty(),
            ),
            shim_error: true,
        }
    }

    /// A lifecycle call: read the request, tell the agent, relay (changed
    /// only for CreateContainer), read the answer, tell the agent.
    async fn hooked(self: &Arc<Self>, h: Hooked, req: Request<Incoming>, start: Instant) -> Answer {
        let (mut parts, incoming) = req.into_parts();
        let (data, trailers) = match body::collect(incoming, MAX_MESSAGE).await {
            Ok(b) => b,
            Err(e) => {
                return Self::shim_status(
                    grpc::INVALID_ARGUMENT,
                    format!("reading the request body: {e}"),
                )
            }
        };
        let Some(msg) = grpc::unframe(&data) else {
            // Compressed or several messages: not ours to read. Relay as is.
            tracing::debug!(method = ?h, "request not a single uncompressed message; relayed unhooked");
            return self
                .forward(Request::from_parts(parts, Body::buffered(data, trailers)))
                .await;
        };
        let mut p = self.prepare(h, &parts.headers, msg, start).await;
        let out = match p.body.take() {
            Some(b) => {
                parts.headers.remove(http::header::CONTENT_LENGTH);
                b
            }
            None => data.clone(),
        };
        if h == Hooked::RunPodSandbox {
            grpc::shorten_timeout(&mut parts.headers, start.elapsed());
        }
        let response = match self
            .send(Request::from_parts(parts, Body::buffered(out, trailers)))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.sandbox_failed(p.starting);
                return self.unavailable(e);
            }
        };
        let (rparts, rbody) = response.into_parts();
        let (rdata, rtrailers) = match body::collect(rbody, MAX_MESSAGE).await {
            Ok(b) => b,
            Err(e) => {
                return Self::shim_status(
                    grpc::INTERNAL,
                    format!("reading the runtime's answer: {e}"),
                )
            }
        };
        let ok = grpc::status_code(&rparts.headers, rtrailers.as_ref()) == 0;
        self.complete(p, ok, grpc::unframe(&rdata));
        Answer {
            response: Response::from_parts(rparts, Body::buffered(rdata, rtrailers)),
            shim_error: false,
        }
    }

    /// The request half of a hooked call, `msg` its one message: the
    /// events to send (RunPodSandbox waits for STARTING's delivery within
    /// its budget), CreateContainer's changed body, and what to do with the
    /// answer ([`Relay::complete`]).
    pub(crate) async fn prepare(
        &self,
        h: Hooked,
        headers: &HeaderMap,
        msg: &[u8],
        start: Instant,
    ) -> Prepared {
        let mut p = Prepared::default();
        match h {
            Hooked::RunPodSandbox => match cri::RunPodSandboxRequest::decode(msg) {
                Ok(r) => {
                    let pod = Pod::from_config(&r.config.unwrap_or_default());
                    if let Some(hooks) = &self.hooks {
                        let budget = self.budget(headers, start);
                        hooks
                            .send_and_wait(pod.event(Kind::SandboxStarting, ""), budget)
                            .await;
                    }
                    p.starting = Some(pod.clone());
                    p.after = Some(Box::new(move |relay, answer| {
                        relay.sandbox_started(pod, answer)
                    }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "RunPodSandboxRequest did not decode; relayed unhooked")
                }
            },
            Hooked::StopPodSandbox | Hooked::RemovePodSandbox => {
                match cri::StopPodSandboxRequest::decode(msg) {
                    // Both requests are `string pod_sandbox_id = 1`.
                    Ok(r) => {
                        let id = r.pod_sandbox_id;
                        p.after = Some(Box::new(move |relay, _| {
                            let (kind, pod) = if h == Hooked::StopPodSandbox {
                                (Kind::SandboxStopped, relay.pods.sandbox(&id))
                            } else {
                                (Kind::SandboxRemoved, relay.pods.remove_sandbox(&id))
                            };
                            relay.notify(pod.event(kind, &id));
                        }));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, method = ?h, "request did not decode; relayed unhooked")
                    }
                }
            }
            Hooked::CreateContainer => match inject::decode(msg) {
                Ok(r) => {
                    if let Some(new) = self
                        .cfg
                        .inject
                        .as_ref()
                        .and_then(|inj| inject::rewrite(inj, msg, &r))
                    {
                        p.body = Some(grpc::frame(&new));
                    }
                    let pod = r
                        .sandbox_config
                        .as_ref()
                        .map(Pod::from_config)
                        .unwrap_or_default();
                    let sandbox_id = r.pod_sandbox_id;
                    let name = r
                        .config
                        .and_then(|c| c.metadata)
                        .map(|m| m.name)
                        .unwrap_or_default();
                    p.after = Some(Box::new(move |relay, answer| {
                        let Ok(resp) = cri::CreateContainerResponse::decode(answer) else {
                            return;
                        };
                        relay.pods.add_container(&resp.container_id, &sandbox_id);
                        let mut ev = pod.event(Kind::ContainerCreated, &sandbox_id);
                        ev.container_id = resp.container_id;
                        ev.container_name = name;
                        relay.notify(ev);
                    }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CreateContainerRequest did not decode; relayed unchanged")
                }
            },
            Hooked::StartContainer | Hooked::StopContainer | Hooked::RemoveContainer => {
                // All three start with `string container_id = 1`.
                match cri::StartContainerRequest::decode(msg) {
                    Ok(r) => {
                        let id = r.container_id;
                        p.after = Some(Box::new(move |relay, _| {
                            let (kind, forget) = match h {
                                Hooked::StartContainer => (Kind::ContainerStarted, false),
                                Hooked::StopContainer => (Kind::ContainerStopped, false),
                                _ => (Kind::ContainerRemoved, true),
                            };
                            relay.notify(relay.pods.container_event(kind, &id, forget));
                        }));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, method = ?h, "request did not decode; relayed unhooked")
                    }
                }
            }
        }
        p
    }

    /// The answer half: `ok` when the runtime answered status 0, `answer`
    /// its one message (if it had exactly one).
    pub(crate) fn complete(&self, p: Prepared, ok: bool, answer: Option<&[u8]>) {
        if let (true, Some(after), Some(answer)) = (ok, p.after, answer) {
            after(self, answer);
        } else if !ok {
            self.sandbox_failed(p.starting);
        }
    }

    /// How long RunPodSandbox may wait for its labels to reach the agent:
    /// the time box, and never more than half of what the client's
    /// deadline leaves.
    fn budget(&self, headers: &HeaderMap, start: Instant) -> Duration {
        let mut b = self.cfg.hook_timeout;
        if let Some(t) = grpc::timeout(headers) {
            b = b.min(t.saturating_sub(start.elapsed()) / 2);
        }
        b
    }

    fn notify(&self, ev: nodeplane_proto::agent::PodLifecycle) {
        if let Some(h) = &self.hooks {
            h.send(ev);
        }
    }

    /// RunPodSandbox failed: the agent forgets the STARTING it got for
    /// this attempt (the kubelet retries with a new attempt).
    fn sandbox_failed(&self, pod: Option<Pod>) {
        if let Some(pod) = pod {
            self.notify(pod.event(Kind::SandboxFailed, ""));
        }
    }

    /// RunPodSandbox succeeded: remember the pod, then (off the call's
    /// path) read the sandbox's netns and IPs and send READY.
    fn sandbox_started(&self, pod: Pod, answer: &[u8]) {
        let Ok(resp) = cri::RunPodSandboxResponse::decode(answer) else {
            return;
        };
        let id = resp.pod_sandbox_id;
        self.pods.add_sandbox(&id, pod.clone());
        let Some(hooks) = self.hooks.clone() else {
            return;
        };
        // READY's place in the queue is taken now, before the client has
        // the answer: whatever it does next with this sandbox (Stop, a
        // container) is reported after READY.
        let sequence = hooks.reserve(pod.event(Kind::SandboxReady, &id), STATUS_HOLD);
        let upstream_path = self.upstream.path().to_path_buf();
        let status = self.sandbox_status(id.clone());
        tokio::spawn(async move {
            let mut ev = pod.event(Kind::SandboxReady, &id);
            match status.await {
                Ok(s) => {
                    ev.netns_path = s.netns;
                    ev.ips = s.ips;
                }
                Err(e) => {
                    tracing::warn!(sandbox = %id, runtime = %upstream_path.display(), error = %e,
                    "PodSandboxStatus for the READY event failed; sending it without netns and IPs")
                }
            }
            hooks.fill(sequence, Some(ev));
        });
    }

    /// What READY needs from a verbose PodSandboxStatus.
    pub(crate) fn sandbox_status(
        &self,
        id: String,
    ) -> impl std::future::Future<Output = crate::Result<SandboxStatus>> + Send + 'static {
        let fut = self.unary(
            "PodSandboxStatus",
            cri::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            },
        );
        async move {
            let r: cri::PodSandboxStatusResponse = fut.await?;
            let status = r.status.unwrap_or_default();
            let ready = status.state == cri::PodSandboxState::SandboxReady as i32;
            let network = status.network.unwrap_or_default();
            let ips = std::iter::once(network.ip)
                .chain(network.additional_ips.into_iter().map(|i| i.ip))
                .filter(|ip| !ip.is_empty())
                .collect();
            Ok(SandboxStatus {
                ready,
                netns: netns_from_info(r.info.get("info").map(String::as_str).unwrap_or("")),
                ips,
            })
        }
    }

    /// A unary RuntimeService call the shim makes itself.
    pub(crate) fn unary<Q: Message, R: Message + Default>(
        &self,
        method: &str,
        q: Q,
    ) -> impl std::future::Future<Output = crate::Result<R>> + Send + 'static {
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://localhost{RUNTIME}{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "10S")
            .body(Body::buffered(grpc::frame(&q.encode_to_vec()), None));
        let upstream = self.upstream.clone();
        async move {
            let req = req.map_err(|e| crate::Error::malformed("internal request", e))?;
            let r = send(&upstream, req).await?;
            let (parts, b) = r.into_parts();
            let (data, trailers) = body::collect(b, MAX_MESSAGE)
                .await
                .map_err(|e| crate::Error::malformed("runtime answer", e))?;
            let code = grpc::status_code(&parts.headers, trailers.as_ref());
            if code != 0 {
                return Err(crate::Error::malformed(
                    "runtime answer",
                    format!("gRPC status {code}"),
                ));
            }
            let msg = grpc::unframe(&data)
                .ok_or_else(|| crate::Error::malformed("runtime answer", "not one message"))?;
            R::decode(msg).map_err(|e| crate::Error::malformed("runtime answer", e))
        }
    }
}

/// Sends `req` to the runtime with its path and authority kept.
async fn send(upstream: &Upstream, req: Request<Body>) -> crate::Result<Response<Incoming>> {
    let (mut parts, body) = req.into_parts();
    absolute(&mut parts.uri)?;
    let req = Request::from_parts(parts, body);
    // A connection found dead as the call is about to go (containerd
    // restarted) is replaced once: the request has not been sent yet.
    let mut sender = upstream.sender().await?;
    if sender.ready().await.is_err() {
        sender = upstream.sender().await?;
    }
    sender
        .send_request(req)
        .await
        .map_err(|e| crate::Error::Runtime {
            path: upstream.path().to_path_buf(),
            reason: e.to_string(),
        })
}

/// The kubelet's own URI (scheme and authority from its pseudo-headers) is
/// kept as it is; one missing either is completed with http://localhost.
fn absolute(uri: &mut Uri) -> crate::Result<()> {
    if uri.scheme().is_some() && uri.authority().is_some() {
        return Ok(());
    }
    let authority = uri
        .authority()
        .map_or("localhost", |a| a.as_str())
        .to_string();
    let pq = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    *uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| crate::Error::malformed("request path", e))?;
    Ok(())
}

/// The network namespace path from containerd's verbose sandbox info
/// (`runtimeSpec.linux.namespaces[type=network].path`); "" if absent.
pub fn netns_from_info(info: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(info) else {
        return String::new();
    };
    v.pointer("/runtimeSpec/linux/namespaces")
        .and_then(|n| n.as_array())
        .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_seven_lifecycle_methods_are_hooked() {
        assert_eq!(
            Hooked::of("/runtime.v1.RuntimeService/RunPodSandbox"),
            Some(Hooked::RunPodSandbox)
        );
        assert_eq!(
            Hooked::of("/runtime.v1.RuntimeService/RemoveContainer"),
            Some(Hooked::RemoveContainer)
        );
        assert_eq!(
            Hooked::of("/runtime.v1.RuntimeService/ListContainers"),
            None
        );
        assert_eq!(
            Hooked::of("/runtime.v1alpha2.RuntimeService/RunPodSandbox"),
            None
        );
        assert_eq!(Hooked::of("/runtime.v1.ImageService/PullImage"), None);
    }

    #[test]
    fn netns_path_comes_from_the_runtime_spec() {
        let info = r#"{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}}}"#;
        assert_eq!(netns_from_info(info), "/var/run/netns/cni-1");
        assert_eq!(netns_from_info("{}"), "");
        assert_eq!(netns_from_info("not json"), "");
    }
}
