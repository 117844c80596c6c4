//! `nodeplane-cnitool`: runs a CNI network configuration list against a
//! network namespace, as a container runtime would. For operators and the
//! quick start; Debian ships no `cnitool`.
//!
//! Usage: nodeplane-cnitool add|del CONFLIST NETNS CONTAINER_ID [IFNAME]
//! Plugins are looked up in $CNI_PATH (default: this binary's directory, then
//! /opt/cni/bin and /usr/lib/cni). DEL uses the result cached by ADD.

use std::path::PathBuf;
use std::process::ExitCode;

use nodeplane_cni::conflist::{self, Attachment};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || !matches!(args[1].as_str(), "add" | "del") {
        eprintln!("usage: nodeplane-cnitool add|del CONFLIST NETNS CONTAINER_ID [IFNAME]");
        return ExitCode::from(2);
    }
    let list = match conflist::load(args[2].as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let att = Attachment {
        container_id: args[4].clone(),
        netns: PathBuf::from(&args[3]),
        ifname: args.get(5).cloned().unwrap_or_else(|| "eth0".into()),
        args: std::env::var("CNI_ARGS").unwrap_or_default(),
    };
    let bin_dirs = bin_dirs();
    // The nodeplane plugin's stateDir and agentSocket may be overridden for
    // experiments (the quick start keeps both apart from a real install).
    let mut overrides = serde_json::Map::new();
    if let Ok(dir) = std::env::var("NODEPLANE_STATE_DIR") {
        overrides.insert("stateDir".into(), dir.into());
    }
    if let Ok(sock) = std::env::var("NODEPLANE_AGENT_SOCKET") {
        overrides.insert("agentSocket".into(), sock.into());
    }
    let cache = std::env::temp_dir().join(format!(
        "nodeplane-cnitool-{}-{}.json",
        att.container_id, att.ifname
    ));
    let outcome = match args[1].as_str() {
        "add" => conflist::add(&list, &bin_dirs, &att, &overrides).map(|r| {
            let _ = std::fs::write(&cache, r.to_string());
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        }),
        _ => {
            let prev = std::fs::read(&cache)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            conflist::del(&list, &bin_dirs, &att, prev.as_ref(), &overrides).map(|()| {
                let _ = std::fs::remove_file(&cache);
            })
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn bin_dirs() -> Vec<PathBuf> {
    if let Ok(p) = std::env::var("CNI_PATH") {
        return p
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
    }
    let mut dirs = Vec::new();
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        dirs.push(d);
    }
    dirs.extend(["/opt/cni/bin", "/usr/lib/cni"].map(PathBuf::from));
    dirs
}
