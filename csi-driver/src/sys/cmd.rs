//! Running the standard tools (mkfs, losetup, btrfs, resize2fs, ...).

use std::process::Command;

use crate::{Error, Result};

/// Runs `program args...`, returning stdout; a non-zero exit is an error
/// carrying the command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| {
            Error::io(
                format!("run {program} (is it installed? see the README's prerequisites)"),
                e,
            )
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            message: format!(
                "{} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
