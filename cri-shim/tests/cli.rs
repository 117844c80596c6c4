//! The binary itself: a bad command line exits 2 naming the problem. Also
//! makes `cargo test --workspace` build `nodeplane-cri-shim`, which the
//! integration tests in `tests/` run (cargo builds a package's binaries for
//! its own integration tests only).

use std::process::Command;

#[test]
fn a_bad_flag_value_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeplane-cri-shim"))
        .args(["--hook-timeout-ms", "soon"])
        .output()
        .expect("run nodeplane-cri-shim");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hook-timeout-ms"), "{err}");
}
