//! The binary's contract with a runtime for bad input: every malformed call
//! gets the spec's JSON error object on stdout with the right code and a
//! message naming the problem, a non-zero exit, and never a panic.
//! These need no root: each fails before touching the kernel.

use std::io::Write;
use std::process::{Command, Stdio};

struct Out {
    code: i32,
    json: serde_json::Value,
    stderr: String,
}

fn run(env: &[(&str, &str)], stdin: &str) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodeplane-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nodeplane-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Out {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout:?}")),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const GOOD: &str = r#"{"cniVersion":"1.1.0","name":"n","type":"nodeplane-cni","podCIDRs":["10.244.0.0/24"],"stateDir":"/tmp/nodeplane-cli-test"}"#;
const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc"),
    ("CNI_NETNS", "/run/netns/nodeplane-cli-test-missing"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/usr/lib/cni"),
];

fn without(var: &str) -> Vec<(&'static str, &'static str)> {
    ADD_ENV.iter().copied().filter(|(k, _)| *k != var).collect()
}

fn with(var: &'static str, value: &'static str) -> Vec<(&'static str, &'static str)> {
    let mut v = without(var);
    v.push((var, value));
    v
}

/// (what, environment, stdin, expected code, text the details must contain)
type Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    String,
    u64,
    &'static str,
);

#[test]
fn malformed_input_table() {
    let cases: Vec<Case> = vec![
        (
            "no CNI_COMMAND",
            without("CNI_COMMAND"),
            GOOD.into(),
            4,
            "CNI_COMMAND",
        ),
        (
            "unknown verb",
            with("CNI_COMMAND", "PATCH"),
            GOOD.into(),
            4,
            "CNI_COMMAND",
        ),
        (
            "no CNI_CONTAINERID",
            without("CNI_CONTAINERID"),
            GOOD.into(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "bad CNI_CONTAINERID",
            with("CNI_CONTAINERID", "../etc"),
            GOOD.into(),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "no CNI_NETNS on ADD",
            without("CNI_NETNS"),
            GOOD.into(),
            4,
            "CNI_NETNS",
        ),
        (
            "no CNI_IFNAME",
            without("CNI_IFNAME"),
            GOOD.into(),
            4,
            "CNI_IFNAME",
        ),
        (
            "long CNI_IFNAME",
            with("CNI_IFNAME", "eth0123456789012"),
            GOOD.into(),
            4,
            "CNI_IFNAME",
        ),
        ("bad JSON", ADD_ENV.to_vec(), "{not json".into(), 6, "JSON"),
        ("empty stdin", ADD_ENV.to_vec(), String::new(), 6, "JSON"),
        (
            "unknown cniVersion",
            ADD_ENV.to_vec(),
            GOOD.replace("1.1.0", "7.0.0"),
            1,
            "7.0.0",
        ),
        (
            "old cniVersion",
            ADD_ENV.to_vec(),
            GOOD.replace("1.1.0", "0.2.0"),
            1,
            "0.2.0",
        ),
        (
            "bad CIDR",
            ADD_ENV.to_vec(),
            GOOD.replace("10.244.0.0/24", "10.244.0.0/99"),
            7,
            "podCIDRs",
        ),
        (
            "CIDR not a string",
            ADD_ENV.to_vec(),
            GOOD.replace("\"10.244.0.0/24\"", "42"),
            7,
            "podCIDRs",
        ),
        (
            "mtu wrong type",
            ADD_ENV.to_vec(),
            GOOD.replace("\"type\"", "\"mtu\":\"jumbo\",\"type\""),
            7,
            "mtu",
        ),
        (
            "name wrong type",
            ADD_ENV.to_vec(),
            GOOD.replace("\"name\":\"n\"", "\"name\":5"),
            7,
            "name",
        ),
        (
            "missing netns",
            ADD_ENV.to_vec(),
            GOOD.into(),
            3,
            "nodeplane-cli-test-missing",
        ),
        (
            "prevResult not an object",
            ADD_ENV.to_vec(),
            GOOD.replace("\"type\"", "\"prevResult\":5,\"type\""),
            6,
            "prevResult",
        ),
    ];
    for (what, env, stdin, code, needle) in cases {
        let out = run(&env, &stdin);
        assert_ne!(out.code, 0, "{what}: must exit non-zero");
        assert_eq!(
            out.json["code"].as_u64(),
            Some(code),
            "{what}: {}",
            out.json
        );
        let details = out.json["details"].as_str().unwrap_or_default();
        assert!(
            details.contains(needle),
            "{what}: details should name {needle:?}: {details}"
        );
        assert!(
            out.json["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: msg"
        );
        assert!(out.json["cniVersion"].is_string(), "{what}: cniVersion");
        assert!(
            !out.stderr.contains("panicked"),
            "{what}: panicked: {}",
            out.stderr
        );
    }
}

#[test]
fn version_lists_every_supported_version_in_the_asked_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_nodeplane-cni"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let out = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.3.1"}"#);
    assert_eq!(out.code, 0);
    assert_eq!(out.json["cniVersion"], "0.3.1");
}
