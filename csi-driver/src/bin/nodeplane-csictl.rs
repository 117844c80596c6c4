//! nodeplane-csictl: one CSI call to a nodeplane CSI driver; see
//! `nodeplane_csi::client`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = nodeplane_csi::client::CtlArgs::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeplane-csictl: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(nodeplane_csi::client::run(args)) {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodeplane-csictl: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
