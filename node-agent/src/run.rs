//! Wiring the agent's tasks together (what `main` runs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::agent::{Agent, Status};
use crate::config::{Config, LogFormat, SourceKind};
use crate::{Error, Result};

/// Sets up logging as configured.
pub fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<()> {
    // Handlers before any socket exists: a SIGTERM that arrived earlier
    // would take the default action and skip the drain and clean-up.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        Error::io(
            format!("create state directory {}", cfg.state_dir.display()),
            e,
        )
    })?;
    let status = Arc::new(Mutex::new(Status::default()));
    let (ev_tx, ev_rx) = mpsc::channel(4096);
    let (call_tx, call_rx) = mpsc::channel(1024);
    let (stop_tx, stop_rx) = oneshot::channel();

    // The API client, shared by the policy source and the app runtime's
    // components (source `kube` only).
    let mut kube_client = None;
    match cfg.source {
        SourceKind::Manifests => {
            let dir = cfg.manifests_dir.clone();
            if !dir.is_dir() {
                return Err(Error::Config(format!(
                    "manifests directory {} does not exist (set --manifests-dir)",
                    dir.display()
                )));
            }
            tokio::spawn(async move {
                if let Err(e) =
                    crate::source::manifests::run(dir, ev_tx, Duration::from_millis(5)).await
                {
                    tracing::error!(error = %e, "manifests source stopped");
                }
            });
        }
        SourceKind::Kube => {
            let client = match &cfg.kube_api {
                Some(url) => crate::source::kube::client_from_url(url).await?,
                None => crate::source::kube::client_default().await?,
            };
            let node = cfg.node_name.clone();
            kube_client = Some(client.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::source::kube::run(client, node, ev_tx).await {
                    tracing::error!(error = %e, "Kubernetes source stopped");
                }
            });
        }
    }
    let listener = crate::api::bind(&cfg.socket)?;
    let lifecycle = Arc::new(crate::lifecycle::Lifecycle::default());
    tokio::spawn(crate::api::serve(listener, call_tx, lifecycle.clone()));
    let shim = lifecycle.clone();
    let (dir_tx, dir_rx) = tokio::sync::watch::channel(Arc::new(Default::default()));
    // The app runtime's Kubernetes Secrets: the API's, or standalone the
    // manifests directory's `kind: Secret` documents.
    let secrets: Arc<dyn nodeplane_runtime::Secrets> = match &kube_client {
        Some(client) => Arc::new(crate::secrets::KubeSecrets {
            client: client.clone(),
        }),
        None => Arc::new(crate::secrets::ManifestSecrets {
            dir: cfg.manifests_dir.clone(),
        }),
    };
    let runtime = match &cfg.runtime {
        Some(rc) => Some(
            crate::runtime::start(
                rc,
                &cfg.state_dir,
                dir_rx,
                lifecycle.clone(),
                &cfg.node_name,
                kube_client,
                secrets,
            )
            .await,
        ),
        None => None,
    };
    let http_status = status.clone();
    let (listen, table) = (cfg.listen, cfg.table.clone());
    // Ready at once when the agent serves no CSI.
    let csi_ready = Arc::new(AtomicBool::new(cfg.csi_pools.is_empty()));
    let (csi_stop, csi_task) = spawn_csi(&cfg, csi_ready.clone())?;
    tokio::spawn(async move {
        if let Err(e) =
            crate::http::serve(listen, http_status, table, lifecycle, csi_ready, runtime).await
        {
            tracing::error!(error = %e, "health/metrics server stopped");
        }
    });
    let socket = cfg.socket.clone();
    tracing::info!(node = %cfg.node_name, source = ?cfg.source, socket = %socket.display(), listen = %cfg.listen, "nodeplane-agent starting");
    let agent = tokio::spawn(
        Agent::new(cfg, status.clone())
            .with_shim(shim)
            .with_directory(dir_tx)
            .run(ev_rx, call_rx, stop_rx),
    );

    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining");
    status.lock().unwrap_or_else(|e| e.into_inner()).draining = true;
    let _ = std::fs::remove_file(&socket);
    let _ = stop_tx.send(());
    let _ = csi_stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    if let Some(t) = csi_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    Ok(())
}

/// With --csi-pool: the CSI driver served beside the agent (nodeplane-csi);
/// `ready` turns true once it serves (it stays false, holding /readyz, if
/// the driver cannot start).
#[allow(clippy::type_complexity)]
fn spawn_csi(
    cfg: &Config,
    ready: Arc<AtomicBool>,
) -> Result<(oneshot::Sender<()>, Option<tokio::task::JoinHandle<()>>)> {
    let (tx, rx) = oneshot::channel::<()>();
    if cfg.csi_pools.is_empty() {
        return Ok((tx, None));
    }
    let csi = nodeplane_csi::CsiArgs {
        endpoint: cfg.csi_endpoint.clone(),
        node_id: Some(cfg.node_name.clone()),
        state_dir: cfg.state_dir.join("csi"),
        pools: cfg.csi_pools.clone(),
        driver_name: nodeplane_csi::config::DEFAULT_DRIVER.into(),
        registration_dir: cfg.csi_registration_dir.clone(),
        default_size: "1Gi".into(),
        max_volumes: 0,
    }
    .resolve()
    .map_err(|e| Error::Config(format!("CSI (--csi-pool, --csi-endpoint): {e}")))?;
    let task = tokio::spawn(async move {
        if let Err(e) = nodeplane_csi::serve_until_ready(
            csi,
            async move {
                let _ = rx.await;
            },
            || ready.store(true, Ordering::SeqCst),
        )
        .await
        {
            tracing::error!(error = %e, "CSI driver stopped");
        }
    });
    Ok((tx, Some(task)))
}

/// `nodeplane-agent csi ...`: the standalone CSI driver (nodeplane-csi does
/// the work; this only sets up logging and the runtime).
pub fn csi_main(args: nodeplane_csi::CsiArgs) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeplane-agent csi: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeplane-agent csi: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nodeplane_csi::serve(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "CSI driver stopped");
            eprintln!("nodeplane-agent csi: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
