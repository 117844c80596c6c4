//! Agent-to-agent invocation across nodes: mutual TLS (rustls) between
//! node agents, HTTP/2, one pooled connection per peer node.
//!
//! Trust: every node certificate is issued by the cluster CA (given at
//! install, or generated on first start in standalone mode under
//! `<state>/tls/`) and names `nodeplane-node`; a peer proves it is a node
//! agent by its certificate, so the caller identity it forwards
//! (`dapr-caller-app-id`, found from the kernel on its own node) is taken
//! as given. The calling node checks access control; the receiving node
//! delivers only to its own pods.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::dapr::ApiError;
use crate::server::Body;
use crate::{Error, Result, Runtime};

/// The name every node certificate carries and every client checks.
pub const PEER_NAME: &str = "nodeplane-node";
/// Where agents listen for each other by default.
pub const DEFAULT_PEER_PORT: u16 = 3501;
/// Header with the target app's namespace on agent-to-agent requests.
pub const TARGET_NS: &str = "nodeplane-target-namespace";

/// Where the node's TLS material comes from. Nothing given: a CA is
/// generated (once) in the state directory and the node issues its own
/// certificate from it; `ca_cert` + `ca_key`: issued from that CA;
/// `ca_cert` + `cert` + `key`: used as they are.
#[derive(Debug, Clone, Default)]
pub struct TlsSources {
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Both sides' rustls configurations.
#[derive(Debug, Clone)]
pub struct Tls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| Error::io(format!("read {}", p.display()), e))
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

/// The CA (cert PEM, key PEM): given, or made once under `dir`.
fn ca(src: &TlsSources, dir: &Path) -> Result<(String, Option<String>)> {
    if let Some(c) = &src.ca_cert {
        return Ok((read(c)?, src.ca_key.as_deref().map(read).transpose()?));
    }
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() && key.exists() {
        return Ok((read(&cert)?, Some(read(&key)?)));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let k = rcgen::KeyPair::generate().map_err(|e| tls_err("generate the CA key", e))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA", e))?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "nodeplane standalone CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let c = params
        .self_signed(&k)
        .map_err(|e| tls_err("sign the CA", e))?;
    let (c, k) = (c.pem(), k.serialize_pem());
    // Key first, then the certificate: a crash between leaves no CA that
    // is missing its key (the next start makes a new one).
    write_private(&key, &k)?;
    std::fs::write(&cert, &c).map_err(|e| Error::io(format!("write {}", cert.display()), e))?;
    tracing::info!(ca = %cert.display(), "peer TLS: generated a standalone CA (give it and its key to the other nodes: --peer-ca, --peer-ca-key)");
    Ok((c, Some(k)))
}

fn write_private(p: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    f.sync_all()
        .map_err(|e| Error::io(format!("sync {}", tmp.display()), e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io(format!("rename to {}", p.display()), e))
}

/// Builds both configurations (see [`TlsSources`]).
pub fn tls(src: &TlsSources, dir: &Path, node_name: &str) -> Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (ca_pem, ca_key) = ca(src, dir)?;
    let (chain_pem, key_pem) = match (&src.cert, &src.key) {
        (Some(c), Some(k)) => (read(c)?, read(k)?),
        (None, None) => {
            let ca_key = ca_key.ok_or_else(|| {
                tls_err(
                    "no node certificate",
                    "give --peer-cert and --peer-key, or the CA's key (--peer-ca-key)",
                )
            })?;
            let signer = rcgen::KeyPair::from_pem(&ca_key).map_err(|e| tls_err("the CA key", e))?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, signer)
                .map_err(|e| tls_err("the CA certificate", e))?;
            let k = rcgen::KeyPair::generate().map_err(|e| tls_err("generate the node key", e))?;
            let mut params =
                rcgen::CertificateParams::new(vec![PEER_NAME.to_string(), node_name.to_string()])
                    .map_err(|e| tls_err("node certificate", e))?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, node_name);
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let c = params
                .signed_by(&k, &issuer)
                .map_err(|e| tls_err("sign the node certificate", e))?;
            (c.pem(), k.serialize_pem())
        }
        _ => {
            return Err(tls_err(
                "node certificate",
                "give both --peer-cert and --peer-key, or neither",
            ))
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| tls_err("the CA certificate", e))?)
            .map_err(|e| tls_err("the CA certificate", e))?;
    }
    let roots = Arc::new(roots);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err("the node certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| tls_err("the node key", e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls_err("client verifier", e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("server", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err("server certificate", e))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("client", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err("client certificate", e))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Tls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Serves other agents' invocations until the listener fails.
pub async fn serve(rt: Arc<Runtime>, listener: tokio::net::TcpListener, tls: Tls) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server);
    loop {
        let (tcp, from) = listener
            .accept()
            .await
            .map_err(|e| Error::io("accept on the peer listener", e))?;
        let _ = tcp.set_nodelay(true);
        let (rt, acceptor) = (rt.clone(), acceptor.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%from, error = %e, "peer TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper::service::service_fn(move |req| {
                let rt = rt.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&rt, req).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(batched(stream)), svc)
                .await;
        });
    }
}

/// One invocation from another node: to a local pod of the app.
async fn handle(rt: &Runtime, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((app, method)) = path
        .strip_prefix("/v1.0/invoke/")
        .and_then(|t| t.split_once("/method/"))
    else {
        return ApiError::not_found(&path).into_response();
    };
    let ns = req
        .headers()
        .get(TARGET_NS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("default")
        .to_string();
    let (app, method) = (app.to_string(), method.to_string());
    let local: Vec<_> = rt
        .directory()
        .endpoints(&ns, &app)
        .into_iter()
        .filter(|p| p.local)
        .collect();
    match crate::invoke::forward_local(rt, &app, &method, &local, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Pooled HTTP/2 connections to peer agents.
pub struct Peers {
    tls: tokio_rustls::TlsConnector,
    conns: Mutex<HashMap<SocketAddr, SendRequest<Body>>>,
    pub port: u16,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("port", &self.port).finish()
    }
}

impl Peers {
    pub fn new(tls: &Tls, port: u16, connect_timeout: Duration) -> Peers {
        Peers {
            tls: tokio_rustls::TlsConnector::from(tls.client.clone()),
            conns: Mutex::new(HashMap::new()),
            port,
            connect_timeout,
        }
    }

    /// The peer agent of a node.
    pub fn addr(&self, host: IpAddr) -> SocketAddr {
        SocketAddr::new(host, self.port)
    }

    /// A usable connection to `addr` (one per peer, multiplexed).
    pub async fn conn(&self, addr: SocketAddr) -> std::io::Result<SendRequest<Body>> {
        if let Some(s) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let tcp = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(PEER_NAME).map_err(std::io::Error::other)?;
        let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(batched(tls)))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, sender.clone());
        Ok(sender)
    }
}

/// The TLS stream with h2's writes gathered, and each flush put off once
/// until the runtime's other ready tasks have run.
///
/// h2 sends a request's HEADERS in one poll of its connection task, then
/// assigns the stream send capacity, which wakes the task piping the body;
/// the DATA frame follows in the next poll. Flushed at once, every small
/// invocation became two TLS records, two writev calls here and two reads
/// and wake-ups on the peer (seen with strace: 107 bytes, then 1,055, about
/// 130 µs apart). Putting the flush off by one yield lets the body pipe run
/// first, so both frames leave in one record. The buffer also joins h2's
/// separate writes of a frame's head and payload, which tokio-rustls would
/// otherwise seal one by one.
struct Coalesce<S> {
    inner: tokio::io::BufWriter<S>,
    /// A pending yield before the next real flush.
    yielding: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    /// The yield for the data now buffered has been taken.
    yielded: bool,
}

fn batched<S>(s: S) -> Coalesce<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    Coalesce {
        inner: tokio::io::BufWriter::with_capacity(32 * 1024, s),
        yielding: None,
        yielded: false,
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for Coalesce<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if !self.yielded && !self.inner.buffer().is_empty() {
            // `yield_now` wakes the task only after the other ready tasks
            // (tokio defers it), unlike a plain self-wake.
            let y = self
                .yielding
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            match y.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    self.yielding = None;
                    self.yielded = true;
                }
            }
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        if r.is_ready() {
            self.yielded = false;
        }
        r
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The status for a peer failure that reached no app.
pub fn peer_error(app: &str, addr: SocketAddr, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "ERR_DIRECT_INVOKE",
        format!("fail to invoke, id: {app}, err: peer agent {addr}: {e}"),
    )
}
