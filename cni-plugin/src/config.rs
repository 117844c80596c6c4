//! The network configuration the runtime streams on stdin, parsed field by
//! field so every mistake names its field and the fix (code 7), while unknown
//! fields pass silently as the spec requires (runtimes add their own).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::version::Version;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodeplane/cni";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const DEFAULT_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const DEFAULT_HOST_PREFIX: &str = "np";

/// How much the optional log file records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// One attachment the runtime still considers live (GC input).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// Where nodeplane-agent listens (its `--socket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/nodeplane/agent.sock";
/// ADD waits this long for the agent before the pod is left to the fail mode.
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 2000;

/// A validated plugin configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    /// The node's pod CIDRs: at most one IPv4 and one IPv6 (Node.spec.podCIDRs).
    pub pod_cidrs: Vec<IpNetwork>,
    /// Addresses or ranges never handed out.
    pub exclude: Vec<IpNetwork>,
    pub state_dir: PathBuf,
    pub mtu: u32,
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
    /// Prefix of host-side veth names (at most 3 bytes; names are prefix + 12 hex).
    pub host_prefix: String,
    pub log_file: Option<PathBuf>,
    pub log_level: LogLevel,
    /// The node agent's local API socket; `""` turns notification off.
    pub agent_socket: PathBuf,
    /// How long ADD waits for the agent to program the pod's policy.
    pub agent_timeout: std::time::Duration,
    /// Same-node pod-to-pod TCP through the eBPF fast path (default on).
    pub fast_path: bool,
    /// The runtime asked for bandwidth limits on this pod
    /// (`runtimeConfig.bandwidth` with a non-zero rate; libcni passes it when
    /// the plugin's entry declares the `bandwidth` capability). The
    /// `bandwidth` plugin shapes on the host veth, which the fast path would
    /// skip, so such a pod stays on the routed path.
    pub bandwidth_limited: bool,
    /// `prevResult` exactly as given, when this plugin runs after another.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

impl NetConf {
    /// Parses stdin bytes. JSON errors are code 6, bad fields code 7, an
    /// unknown `cniVersion` code 1.
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let value: Value = serde_json::from_slice(bytes).map_err(Error::Decode)?;
        Self::from_json(&value)
    }

    /// Validates an already-decoded configuration.
    pub fn from_json(value: &Value) -> Result<NetConf> {
        let obj = value.as_object().ok_or_else(|| {
            Error::config("(top level)", "the configuration must be a JSON object")
        })?;
        Self::from_object(obj)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<NetConf> {
        let version = Version::parse(&string(obj, "cniVersion")?.ok_or_else(|| {
            Error::config(
                "cniVersion",
                "missing; set it to the spec version, e.g. \"1.1.0\"",
            )
        })?)?;
        let name = string(obj, "name")?
            .ok_or_else(|| Error::config("name", "missing; every network needs a name"))?;
        validate_network_name(&name)?;

        let state_dir = string(obj, "stateDir")?.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if !state_dir.starts_with('/') {
            return Err(Error::config(
                "stateDir",
                format!("{state_dir:?} must be an absolute path"),
            ));
        }
        let pod_cidrs = match obj.get("podCIDRs") {
            // Not configured: the node agent writes the Node's podCIDRs.
            None | Some(Value::Null) => agent_pod_cidrs(Path::new(&state_dir), &name)?,
            Some(_) => cidrs(obj, "podCIDRs")?,
        };
        if pod_cidrs.is_empty() {
            return Err(Error::config(
                "podCIDRs",
                "empty; give the node's pod CIDRs, e.g. [\"10.244.0.0/24\", \"fd00:10:244::/64\"], or leave it out so nodeplane-agent supplies them",
            ));
        }
        validate_pools(&pod_cidrs)?;
        let exclude = cidrs(obj, "exclude")?;

        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => DEFAULT_MTU,
            Some(v) => match v.as_u64() {
                Some(m @ 68..=65535) => m as u32,
                _ => {
                    return Err(Error::config(
                        "mtu",
                        format!("{v} is not an integer between 68 and 65535"),
                    ))
                }
            },
        };
        let gateway_v4 = match string(obj, "gatewayIPv4")? {
            None => DEFAULT_GATEWAY_V4,
            Some(s) => s.parse::<Ipv4Addr>().map_err(|_| {
                Error::config(
                    "gatewayIPv4",
                    format!("{s:?} is not an IPv4 address (default 169.254.1.1)"),
                )
            })?,
        };
        let gateway_v6 = match string(obj, "gatewayIPv6")? {
            None => DEFAULT_GATEWAY_V6,
            Some(s) => s.parse::<Ipv6Addr>().map_err(|_| {
                Error::config(
                    "gatewayIPv6",
                    format!("{s:?} is not an IPv6 address (default fe80::1)"),
                )
            })?,
        };
        let host_prefix =
            string(obj, "hostInterfacePrefix")?.unwrap_or_else(|| DEFAULT_HOST_PREFIX.into());
        if host_prefix.is_empty()
            || host_prefix.len() > 3
            || !host_prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(Error::config(
                "hostInterfacePrefix",
                format!("{host_prefix:?} must be 1 to 3 letters or digits (host names are prefix + 12 hex digits)"),
            ));
        }
        let log_file = string(obj, "logFile")?.map(PathBuf::from);
        let log_level = match string(obj, "logLevel")?.as_deref() {
            None | Some("info") => LogLevel::Info,
            Some("error") => LogLevel::Error,
            Some("warn") => LogLevel::Warn,
            Some("debug") => LogLevel::Debug,
            Some(other) => {
                return Err(Error::config(
                    "logLevel",
                    format!("{other:?} is not one of error, warn, info, debug"),
                ))
            }
        };
        let agent_socket =
            string(obj, "agentSocket")?.unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into());
        let agent_timeout = match obj.get("agentTimeoutMs") {
            None | Some(Value::Null) => DEFAULT_AGENT_TIMEOUT_MS,
            Some(v) => v.as_u64().filter(|ms| *ms <= 60_000).ok_or_else(|| {
                Error::config(
                    "agentTimeoutMs",
                    format!("{v} is not an integer between 0 and 60000"),
                )
            })?,
        };
        let fast_path = match obj.get("fastPath") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(Error::config(
                    "fastPath",
                    format!("{v} is not true or false"),
                ))
            }
        };
        // Validating the limits is the bandwidth plugin's job; here only
        // "is any rate set" matters.
        let bandwidth_limited = obj
            .get("runtimeConfig")
            .and_then(|r| r.get("bandwidth"))
            .is_some_and(|b| {
                ["ingressRate", "egressRate"]
                    .iter()
                    .any(|k| b.get(k).and_then(Value::as_f64).is_some_and(|r| r > 0.0))
            });
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => {
                return Err(Error::PrevResult(format!(
                    "prevResult must be an object, got {v}"
                )))
            }
        };
        let valid_attachments = valid_attachments(obj)?;

        Ok(NetConf {
            version,
            name,
            pod_cidrs,
            exclude,
            state_dir: PathBuf::from(state_dir),
            mtu,
            gateway_v4,
            gateway_v6,
            host_prefix,
            log_file,
            log_level,
            agent_socket: PathBuf::from(agent_socket),
            agent_timeout: std::time::Duration::from_millis(agent_timeout),
            fast_path,
            bandwidth_limited,
            prev_result,
            valid_attachments,
        })
    }

    /// The gateway the pod routes through for an address family.
    pub fn gateway_for(&self, ip: &IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => IpAddr::V4(self.gateway_v4),
            IpAddr::V6(_) => IpAddr::V6(self.gateway_v6),
        }
    }
}

/// An optional string field; a non-string is a code-7 error naming the field.
fn string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(Error::config(
            field,
            format!("must be a string, got {other}"),
        )),
    }
}

/// An optional list of CIDRs (a bare address means a /32 or /128).
fn cidrs(obj: &Map<String, Value>, field: &str) -> Result<Vec<IpNetwork>> {
    let list = match obj.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(Error::config(
                field,
                format!("must be a list of CIDR strings, got {other}"),
            ))
        }
    };
    list.iter()
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| Error::config(field, format!("entry {v} is not a string")))?;
            s.parse::<IpNetwork>().map_err(|e| {
                Error::config(
                    field,
                    format!("{s:?} is not a CIDR ({e}), e.g. \"10.244.0.0/24\""),
                )
            })
        })
        .collect()
}

/// The file in which nodeplane-agent leaves the node's pod CIDRs for a
/// network (from Node.spec.podCIDRs or its --pod-cidr): a JSON array.
pub fn pod_cidrs_file(state_dir: &Path, network: &str) -> PathBuf {
    state_dir.join(network).join("pod-cidrs.json")
}

fn agent_pod_cidrs(state_dir: &Path, network: &str) -> Result<Vec<IpNetwork>> {
    let path = pod_cidrs_file(state_dir, network);
    let pending = |why: String| Error::PodCidrsPending {
        path: path.clone(),
        why,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| pending(e.to_string()))?;
    let list: Vec<String> = serde_json::from_str(&text).map_err(|e| pending(e.to_string()))?;
    list.iter()
        .map(|c| {
            c.parse::<IpNetwork>()
                .map_err(|e| pending(format!("{c}: {e}")))
        })
        .collect()
}

/// One pool per family, large enough to hold a pod, given in canonical form.
fn validate_pools(pools: &[IpNetwork]) -> Result<()> {
    let v4 = pools.iter().filter(|p| p.is_ipv4()).count();
    let v6 = pools.iter().filter(|p| p.is_ipv6()).count();
    if v4 > 1 || v6 > 1 {
        return Err(Error::config(
            "podCIDRs",
            "give at most one IPv4 and one IPv6 CIDR (as Node.spec.podCIDRs does)",
        ));
    }
    for p in pools {
        if p.network() != p.ip() {
            return Err(Error::config(
                "podCIDRs",
                format!(
                    "{p} has host bits set; did you mean {}/{}?",
                    p.network(),
                    p.prefix()
                ),
            ));
        }
        let too_small = match p {
            IpNetwork::V4(n) => n.prefix() > 30,
            IpNetwork::V6(n) => n.prefix() > 126,
        };
        if too_small {
            return Err(Error::config(
                "podCIDRs",
                format!("{p} is too small to allocate pod addresses from"),
            ));
        }
    }
    Ok(())
}

/// Spec: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`; it also names our state directory,
/// so this check keeps paths inside stateDir.
fn validate_network_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            "name",
            format!("{name:?} must start with a letter or digit and contain only letters, digits, '_', '.' or '-'"),
        ))
    }
}

fn valid_attachments(obj: &Map<String, Value>) -> Result<Option<Vec<ValidAttachment>>> {
    const FIELD: &str = "cni.dev/valid-attachments";
    // libcni also sends the key under its pre-1.1 misspelling; accept either.
    let list = match obj.get(FIELD).or_else(|| obj.get("cni.dev/attachments")) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(Error::config(FIELD, format!("must be a list, got {other}"))),
    };
    list.iter()
        .map(|v| {
            let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(container_id), Some(ifname)) => Ok(ValidAttachment {
                    container_id,
                    ifname,
                }),
                _ => Err(Error::config(
                    FIELD,
                    format!("entry {v} needs string fields containerID and ifname"),
                )),
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf> {
        NetConf::parse(s.as_bytes())
    }

    const GOOD: &str = r#"{"cniVersion":"1.1.0","name":"nodeplane","type":"nodeplane-cni",
        "podCIDRs":["10.244.0.0/24","fd00:10:244::/64"]}"#;

    #[test]
    fn defaults_apply() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.gateway_v4, DEFAULT_GATEWAY_V4);
        assert_eq!(c.pod_cidrs.len(), 2);
    }

    #[test]
    fn bandwidth_limits_are_noticed_only_when_a_rate_is_set() {
        let with = |rc: &str| {
            let conf = GOOD.replacen('{', &format!("{{\"runtimeConfig\":{rc},"), 1);
            parse(&conf).expect("valid").bandwidth_limited
        };
        assert!(!parse(GOOD).expect("valid").bandwidth_limited);
        assert!(with(
            r#"{"bandwidth":{"ingressRate":1000000,"ingressBurst":10000}}"#
        ));
        assert!(with(
            r#"{"bandwidth":{"egressRate":1000000,"egressBurst":10000}}"#
        ));
        assert!(!with(r#"{"bandwidth":{"ingressRate":0,"egressRate":0}}"#));
        assert!(!with(r#"{"bandwidth":{}}"#));
        assert!(!with(r#"{"portMappings":[]}"#));
    }

    #[test]
    fn pod_cidrs_come_from_the_agent_when_not_configured() {
        let dir = std::env::temp_dir().join(format!("np-cfg-cidrs-{}", std::process::id()));
        let file = pod_cidrs_file(&dir, "n");
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, r#"["10.9.0.0/24","fd00:9::/64"]"#).expect("write");
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","stateDir":"{}"}}"#,
            dir.display()
        );
        let c = parse(&conf).expect("podCIDRs from the agent's file");
        assert_eq!(c.pod_cidrs.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn malformed_input_gets_the_right_code_and_names_the_field() {
        let cases: &[(&str, u32, &str)] = &[
            ("not json", 6, "JSON"),
            ("[1,2]", 7, "object"),
            (
                r#"{"name":"n","podCIDRs":["10.0.0.0/24"]}"#,
                7,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","podCIDRs":["10.0.0.0/24"]}"#,
                1,
                "9.9.9",
            ),
            (
                r#"{"cniVersion":"1.0.0","podCIDRs":["10.0.0.0/24"]}"#,
                7,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"../x","podCIDRs":["10.0.0.0/24"]}"#,
                7,
                "name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":[]}"#,
                7,
                "podCIDRs",
            ),
            // Absent: the agent's file is read; none there yet is code 11.
            (
                r#"{"cniVersion":"1.0.0","name":"n","stateDir":"/nonexistent/np"}"#,
                11,
                "pod-cidrs.json",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":"10.0.0.0/24"}"#,
                7,
                "podCIDRs",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/33"]}"#,
                7,
                "podCIDRs",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.1/24"]}"#,
                7,
                "host bits",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24","10.1.0.0/24"]}"#,
                7,
                "one IPv4",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24"],"mtu":"big"}"#,
                7,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24"],"mtu":10}"#,
                7,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24"],"stateDir":"rel"}"#,
                7,
                "stateDir",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24"],"exclude":[5]}"#,
                7,
                "exclude",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","podCIDRs":["10.0.0.0/24"],"prevResult":[]}"#,
                6,
                "prevResult",
            ),
        ];
        for (input, code, needle) in cases {
            let e = parse(input).expect_err(input);
            assert_eq!(e.code(), *code, "{input}: {e}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn reads_valid_attachments() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","podCIDRs":["10.0.0.0/24"],
            "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .expect("valid");
        assert_eq!(c.valid_attachments.expect("present").len(), 1);
    }
}
