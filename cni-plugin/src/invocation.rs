//! The runtime's half of a call: `CNI_*` environment variables, validated the
//! way the spec defines them, so a bad value fails with code 4 naming the
//! variable instead of surfacing later as a confusing kernel error.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The verb in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            other => {
                return Err(Error::Env {
                    var: "CNI_COMMAND",
                    problem: format!(
                        "unknown verb {other:?}; expected ADD, DEL, CHECK, GC, STATUS or VERSION"
                    ),
                })
            }
        })
    }
}

/// The attachment a container-scoped verb (ADD, DEL, CHECK) acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// `CNI_NETNS`: required for ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` as key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, ...).
    pub args: Vec<(String, String)>,
}

impl Attachment {
    /// Value of one `CNI_ARGS` key, e.g. `K8S_POD_NAME`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Everything the environment says about this call.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    /// Present for ADD, DEL and CHECK.
    pub attachment: Option<Attachment>,
}

impl Invocation {
    /// Reads and validates the environment through `get` (a closure so tests
    /// need not mutate the process environment).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation> {
        let command =
            match get("CNI_COMMAND") {
                Some(c) => Command::parse(&c)?,
                None => return Err(Error::Env {
                    var: "CNI_COMMAND",
                    problem:
                        "not set; the runtime must set it to ADD, DEL, CHECK, GC, STATUS or VERSION"
                            .into(),
                }),
            };
        let attachment = match command {
            Command::Add | Command::Del | Command::Check => {
                let container_id = required(&get, "CNI_CONTAINERID")?;
                validate_container_id(&container_id)?;
                let ifname = required(&get, "CNI_IFNAME")?;
                validate_ifname(&ifname)?;
                let netns = match (command, get("CNI_NETNS").filter(|s| !s.is_empty())) {
                    (_, Some(p)) => Some(PathBuf::from(p)),
                    (Command::Del, None) => None,
                    (_, None) => return Err(missing("CNI_NETNS")),
                };
                let args = parse_args(get("CNI_ARGS").as_deref().unwrap_or(""))?;
                Some(Attachment {
                    container_id,
                    ifname,
                    netns,
                    args,
                })
            }
            Command::Gc | Command::Status | Command::Version => None,
        };
        Ok(Invocation {
            command,
            attachment,
        })
    }
}

fn missing(var: &'static str) -> Error {
    Error::Env {
        var,
        problem: "not set; the runtime must set it for this verb".into(),
    }
}

fn required(get: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<String> {
    get(var)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(var))
}

/// Spec: starts with an alphanumeric, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(Error::Env {
            var: "CNI_CONTAINERID",
            problem: format!("{id:?} must start with a letter or digit and contain only letters, digits, '_', '.' or '-'"),
        })
    }
}

/// Spec: not empty, not `.`/`..`, under 16 bytes, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<()> {
    let problem = if name == "." || name == ".." {
        Some("must not be \".\" or \"..\"")
    } else if name.len() > 15 {
        Some("must be at most 15 bytes (Linux IFNAMSIZ)")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("must not contain '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::Env {
            var: "CNI_IFNAME",
            problem: format!("{name:?} {p}"),
        }),
        None => Ok(()),
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn parse_args(s: &str) -> Result<Vec<(String, String)>> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(Error::Env {
                var: "CNI_ARGS",
                problem: format!("{pair:?} is not KEY=VALUE (pairs are separated by ';')"),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn err_var(pairs: &[(&str, &str)]) -> (u32, String) {
        let e = Invocation::from_env(env(pairs)).expect_err("must fail");
        (e.code(), e.to_string())
    }

    #[test]
    fn add_needs_container_id_netns_and_ifname() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (code, msg) = err_var(&base);
        assert_eq!(code, 4);
        assert!(msg.contains("CNI_NETNS"), "{msg}");
        let (code, msg) = err_var(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(code, 4);
        assert!(msg.contains("CNI_CONTAINERID"), "{msg}");
    }

    #[test]
    fn del_tolerates_a_missing_netns() {
        let inv = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .expect("DEL without CNI_NETNS is valid");
        assert_eq!(inv.attachment.expect("attachment").netns, None);
    }

    #[test]
    fn rejects_bad_values_naming_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("CNI_COMMAND", "FROB", "CNI_COMMAND"),
            ("CNI_CONTAINERID", "-abc", "CNI_CONTAINERID"),
            ("CNI_CONTAINERID", "a b", "CNI_CONTAINERID"),
            ("CNI_IFNAME", "averyveryverylongname", "CNI_IFNAME"),
            ("CNI_IFNAME", "a/b", "CNI_IFNAME"),
            ("CNI_IFNAME", "..", "CNI_IFNAME"),
            ("CNI_ARGS", "K8S_POD_NAME", "CNI_ARGS"),
        ];
        for (var, value, named) in cases {
            let mut pairs = vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/run/netns/x"),
            ];
            pairs.retain(|(k, _)| k != var);
            pairs.push((var, value));
            let (code, msg) = err_var(&pairs);
            assert_eq!(code, 4, "{var}={value}");
            assert!(msg.contains(named), "{var}={value}: {msg}");
        }
    }

    #[test]
    fn parses_k8s_args() {
        let inv = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ]))
        .expect("valid");
        let a = inv.attachment.expect("attachment");
        assert_eq!(a.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(a.arg("K8S_POD_NAMESPACE"), Some("default"));
    }
}
