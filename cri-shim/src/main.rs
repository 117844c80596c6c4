//! `nodeplane-cri-shim --listen unix:///PATH --runtime-endpoint unix:///PATH
//! [--agent-endpoint unix:///PATH]`: see the README's "CRI shim" section.

use clap::Parser;
use nodeplane_cri_shim::Args;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(&args.log_level, args.log_json);
    let threads = args.worker_threads;
    let slice = args.sched_slice_us;
    let cfg = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeplane-cri-shim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    // The main thread runs the relay with one worker thread; the others get
    // the slice as they start.
    if let Err(e) = nodeplane_cri_shim::sched::short_slice(slice) {
        tracing::warn!(error = %e, slice_us = slice, "could not set the scheduler slice; the kernel's default applies");
    }
    builder.on_thread_start(move || {
        let _ = nodeplane_cri_shim::sched::short_slice(slice);
    });
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeplane-cri-shim: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nodeplane_cri_shim::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "nodeplane-cri-shim failed");
            eprintln!("nodeplane-cri-shim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}
