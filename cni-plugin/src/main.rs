//! `nodeplane-cni`: reads the CNI environment and stdin, runs the verb, and
//! prints the result or the spec's error object on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return emit_error("1.1.0", &nodeplane_cni::Error::Stdin(e));
    }
    let outcome = nodeplane_cni::run(|k| std::env::var(k).ok(), &stdin);
    match outcome.result {
        Ok(Some(json)) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{json}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => emit_error(&outcome.cni_version, &e),
    }
}

fn emit_error(version: &str, e: &nodeplane_cni::Error) -> ExitCode {
    let _ = writeln!(std::io::stdout().lock(), "{}", e.to_json(version));
    ExitCode::FAILURE
}
