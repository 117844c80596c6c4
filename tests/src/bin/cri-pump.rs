//! A byte pump between two unix sockets, to tell how much of the CRI
//! shim's cost any relay would pay on this machine: one more process and
//! one more hop, and no HTTP/2 parsing at all. It takes the shim's command
//! line (only `--listen` and `--runtime-endpoint` are read) so that
//! `NODEPLANE_CRI_SHIM_BIN=<this binary> cri-bench` measures it in the
//! shim's place. Not a relay anyone should deploy: it hooks nothing.

use nodeplane_tests::cri::shim_arg;

use tokio::net::{UnixListener, UnixStream};

/// Read buffer per direction: a ListContainers answer fits in one read.
const BUF: usize = 256 << 10;

fn main() -> std::io::Result<()> {
    let (Some(listen), Some(runtime)) = (shim_arg("listen"), shim_arg("runtime-endpoint")) else {
        eprintln!(
            "usage: cri-pump --listen=unix://PATH --runtime-endpoint=unix://PATH [ignored...]"
        );
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(&listen);
        let listener = UnixListener::bind(&listen).map_err(|e| {
            std::io::Error::new(e.kind(), format!("bind {}: {e}", listen.display()))
        })?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (mut down, _) = tokio::select! {
                a = listener.accept() => a?,
                _ = term.recv() => return Ok(()),
            };
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let mut up = match UnixStream::connect(&runtime).await {
                    Ok(u) => u,
                    Err(e) => {
                        // The client sees its connection closed.
                        eprintln!("cri-pump: connect {}: {e}", runtime.display());
                        return;
                    }
                };
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, BUF, BUF).await;
            });
        }
    })
}
