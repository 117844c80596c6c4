//! `--profile N`: a fixed number of calls through the shim only, for
//! counts that do not depend on the machine's load: syscalls per call
//! (`strace -c -f` attached to the shim around exactly these calls) and,
//! with the shim run under callgrind (see the help text), instructions per
//! call (two runs, N and 0, subtracted).

use std::process::{Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

use crate::latency::{call, METHODS};

/// Runs `n` calls of each method through the shim; with `strace`, counts
/// the shim's syscalls over exactly those calls and prints them per call.
pub async fn run(
    n: usize,
    strace: bool,
    shim: Channel,
    pid: u32,
    container: &str,
) -> anyhow::Result<()> {
    // Warm-up: connections open, allocator and HPACK tables settled.
    for m in METHODS {
        for _ in 0..50 {
            call(m, &shim, container).await?;
        }
    }
    if strace {
        for m in METHODS {
            let counts = traced(pid, &format!("{m:?}"), || async {
                for _ in 0..n {
                    call(m, &shim, container).await?;
                }
                anyhow::Ok(())
            })
            .await?;
            println!("syscalls by the shim per {m:?} call (strace -c -f -p <shim>, {n} calls):");
            for (name, c) in counts {
                println!("  {name:<16} {:>7.2}", c as f64 / n.max(1) as f64);
            }
        }
    } else {
        for m in METHODS {
            for _ in 0..n {
                call(m, &shim, container).await?;
            }
        }
    }
    println!(
        "profile: {n} calls of each of {} methods through the shim",
        METHODS.len()
    );
    Ok(())
}

/// Runs `f` with `strace -c -f` attached to `pid`; the syscall counts.
async fn traced<F, Fut>(pid: u32, name: &str, f: F) -> anyhow::Result<Vec<(String, u64)>>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let out = std::env::temp_dir().join(format!("cri-bench-strace.{}", std::process::id()));
    // CRI_BENCH_STRACE_LOG=FILE: every syscall to FILE.<method> instead of counts
    // (to see which frames go out in which write).
    let log = std::env::var("CRI_BENCH_STRACE_LOG")
        .ok()
        .map(|f| format!("{f}.{name}"));
    let mut cmd = Command::new("strace");
    match &log {
        Some(f) => cmd.args(["-f", "-tt", "-s", "0", "-o"]).arg(f),
        None => cmd.args(["-c", "-f", "-o"]).arg(&out),
    };
    let mut child = cmd
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("strace (Debian package strace): {e}"))?;
    // Time for strace to attach to every thread of the shim.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = f().await;
    // SAFETY: signalling our own child, which then detaches and reports.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    r?;
    if log.is_some() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    let mut counts = Vec::new();
    for line in text.lines() {
        // "% time  seconds  usecs/call  calls  [errors]  syscall"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
            if let Ok(c) = f[3].parse::<u64>() {
                counts.push((f[f.len() - 1].to_string(), c));
            }
        }
    }
    Ok(counts)
}
