//! nodeplane-cri-shim as a process: bad flags are refused with the flag
//! named (exit 2, nothing bound), a stale socket from a killed shim is
//! replaced, and SIGTERM stops it cleanly, removing its socket.

use std::process::Command;
use std::time::{Duration, Instant};

use nodeplane_tests::cri::{shim_bin, Shim};
use nodeplane_tests::TempDir;

#[test]
fn cri_shim_refuses_bad_flags_naming_them() {
    let dir = TempDir::new("shimcli");
    let sock = dir.path().join("s.sock");
    for (args, want) in [
        (
            vec!["--runtime-endpoint=tcp://127.0.0.1:1".to_string()],
            "--runtime-endpoint",
        ),
        (
            vec![
                format!("--listen=unix://{}", sock.display()),
                format!("--runtime-endpoint={}", sock.display()),
            ],
            "relay to itself",
        ),
        (
            vec!["--runtime-connections=0".to_string()],
            "--runtime-connections",
        ),
        (
            vec!["--runtime-mount=relative/dir".to_string()],
            "--runtime-mount",
        ),
    ] {
        let out = Command::new(shim_bin())
            .args(&args)
            .output()
            .expect("run shim");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!sock.exists(), "a refused configuration must bind nothing");
    }
}

#[test]
fn cri_shim_replaces_a_stale_socket_and_stops_cleanly_on_sigterm() {
    let dir = TempDir::new("shimterm");
    let runtime = dir.path().join("runtime.sock");
    let mut shim = Shim::start(&runtime, &["--no-inject"]);
    // kill -9 leaves the socket file; the next start must replace it.
    shim.kill9();
    assert!(shim.socket.exists());
    shim.restart();
    let pid = shim.pid().expect("running");
    // SAFETY: kill has no memory-safety preconditions; `pid` is our child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = shim.try_wait() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "shim did not stop on SIGTERM:\n{}",
            shim.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        shim.log_text()
    );
    assert!(!shim.socket.exists(), "socket left behind after SIGTERM");
    assert!(shim.log_text().contains("stopped"), "{}", shim.log_text());
}
