//! nodeplane's CSI driver: node-local volumes for Kubernetes.
//!
//! [`service`] states the Identity, Controller and Node services as domain
//! traits; [`driver::Driver`] implements them over volume pools
//! ([`backend`]: `image` files on loop devices, `btrfs` subvolumes with
//! qgroup limits) with crash-safe metadata ([`store`]); [`grpc`] serves any
//! implementation as the CSI v1 gRPC services ([`convert`] maps the wire
//! types), and [`registration`] answers the kubelet's plugin watcher.
//! [`serve`] runs all of it on unix sockets; [`client`] is the small CSI
//! client behind `nodeplane-csictl` (quick start, manual checks).
//!
//! This crate must not touch storage outside its configured pools and state
//! directory, nor mounts other than the staging and target paths the CO
//! passes it.

pub mod backend;
pub mod client;
pub mod config;
pub mod convert;
pub mod crash;
pub mod driver;
pub mod error;
pub mod grpc;
pub mod model;
pub mod registration;
pub mod service;
pub mod store;
pub mod sys;

use std::path::Path;
use std::sync::Arc;

pub use config::{CsiArgs, CsiConfig};
pub use error::{Error, Result};

use nodeplane_proto::csi as pb;
use nodeplane_proto::pluginregistration as reg;

fn bind(path: &Path) -> Result<tokio_stream::wrappers::UnixListenerStream> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    // A socket left by a killed predecessor.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io(format!("listen on {}", path.display()), e))?;
    Ok(tokio_stream::wrappers::UnixListenerStream::new(l))
}

/// Opens the driver (reconciling after a restart) and serves CSI (and plugin
/// registration, when configured) until `shutdown` resolves.
pub async fn serve_until(
    cfg: CsiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_until_ready(cfg, shutdown, || {}).await
}

/// [`serve_until`], calling `ready` once the driver is open and its
/// sockets listen (the agent's /readyz waits for it).
pub async fn serve_until_ready(
    cfg: CsiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<()> {
    let dcfg = cfg.driver.clone();
    let driver = tokio::task::spawn_blocking(move || driver::Driver::open(dcfg))
        .await
        .map_err(|e| Error::Config(format!("driver start-up task failed: {e}")))??;
    let csi = grpc::Csi(Arc::new(driver));
    let incoming = bind(&cfg.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut reg_task = None;
    if let Some(reg_path) = &cfg.registration_socket {
        let reg_in = bind(reg_path)?;
        let svc = registration::Registration {
            driver: cfg.driver.name.clone(),
            endpoint: cfg.socket.to_string_lossy().into_owned(),
        };
        let mut rx = stop_rx.clone();
        reg_task = Some(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(reg::registration_server::RegistrationServer::new(svc))
                .serve_with_incoming_shutdown(reg_in, async move {
                    let _ = rx.changed().await;
                }),
        ));
    }
    tracing::info!(socket = %cfg.socket.display(), driver = %cfg.driver.name, node = %cfg.driver.node_id, "CSI driver serving");
    ready();
    let mut rx = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let r = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(csi.clone()))
        .add_service(pb::controller_server::ControllerServer::new(csi.clone()))
        .add_service(pb::node_server::NodeServer::new(csi))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = rx.changed().await;
        })
        .await;
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(t) = reg_task {
        let _ = t.await;
        if let Some(p) = &cfg.registration_socket {
            let _ = std::fs::remove_file(p);
        }
    }
    r.map_err(Error::from)
}

/// `nodeplane-agent csi`: serves until SIGTERM or SIGINT.
pub async fn serve(cfg: CsiConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    serve_until(cfg, async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: CSI driver stopping");
    })
    .await
}
