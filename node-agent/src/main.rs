//! nodeplane-agent: see the library crate for what it does.

use clap::Parser;
use nodeplane_agent::config::{Args, Command, Config};

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if let Some(Command::Csi(csi)) = args.command.take() {
        return nodeplane_agent::run::csi_main(csi);
    }
    let cfg = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeplane-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    nodeplane_agent::run::init_logging(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeplane-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nodeplane_agent::run::run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "nodeplane-agent stopped");
            eprintln!("nodeplane-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
