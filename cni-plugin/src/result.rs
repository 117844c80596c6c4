//! The CNI Success result, read from `prevResult` in any supported version and
//! written in the version the configuration asked for.
//!
//! Kept as close to the wire as possible (strings for addresses) so a chained
//! plugin's result passes through this plugin unchanged, field for field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub dns: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in results before 1.0.0; recomputed from `address` on output.
    #[serde(default, skip_serializing)]
    pub version: Option<String>,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl CniResult {
    /// Reads a `prevResult` of any supported version.
    pub fn from_prev(value: &Value) -> Result<CniResult> {
        serde_json::from_value(value.clone()).map_err(|e| Error::PrevResult(e.to_string()))
    }

    /// Appends `ours` after this result, re-basing its interface indexes, as
    /// a chained plugin must when it receives a `prevResult`.
    pub fn merge(mut self, ours: CniResult) -> CniResult {
        let base = self.interfaces.len();
        self.interfaces.extend(ours.interfaces);
        self.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        self.routes.extend(ours.routes);
        if self.dns.is_null() {
            self.dns = ours.dns;
        }
        self
    }

    /// The result as JSON in `version`: before 1.0.0 each IP carries
    /// `"version"`, and fields 1.1.0 introduced are left out of older versions.
    pub fn to_json(&self, version: Version) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        let obj = match v.as_object_mut() {
            Some(o) => o,
            None => return v,
        };
        if version.ips_carry_version() {
            if let Some(Value::Array(ips)) = obj.get_mut("ips") {
                for ip in ips.iter_mut() {
                    let family = match ip.get("address").and_then(Value::as_str) {
                        Some(a) if a.contains(':') => "6",
                        _ => "4",
                    };
                    if let Some(o) = ip.as_object_mut() {
                        o.insert("version".into(), Value::from(family));
                    }
                }
            }
        }
        if !version.has_1_1_fields() {
            strip(obj.get_mut("interfaces"), &["mtu", "socketPath", "pciID"]);
            strip(
                obj.get_mut("routes"),
                &["mtu", "advmss", "priority", "table", "scope"],
            );
        }
        obj.insert("cniVersion".into(), Value::from(version.as_str()));
        v
    }
}

fn strip(list: Option<&mut Value>, fields: &[&str]) {
    if let Some(Value::Array(items)) = list {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            for f in fields {
                item.remove(*f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("02:00:00:00:00:01".into()),
                mtu: Some(1500),
                sandbox: Some("/run/netns/p".into()),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    address: "10.0.0.2/32".into(),
                    gateway: Some("169.254.1.1".into()),
                    interface: Some(0),
                    ..Default::default()
                },
                IpConfig {
                    address: "fd00::2/128".into(),
                    gateway: Some("fe80::1".into()),
                    interface: Some(0),
                    ..Default::default()
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".into()),
                ..Default::default()
            }],
            dns: Value::Null,
        }
    }

    #[test]
    fn old_versions_carry_ip_version_and_lose_1_1_fields() {
        let v = sample().to_json(Version::V0_3_1);
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        assert!(v["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn new_versions_have_no_ip_version() {
        let v = sample().to_json(Version::V1_1_0);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][0]["mtu"], 1500);
        let v = sample().to_json(Version::V1_0_0);
        assert!(v["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn merge_rebases_interface_indexes_and_keeps_prev_entries() {
        let prev = CniResult::from_prev(&json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "other"}],
            "ips": [{"version": "4", "address": "192.168.0.2/24", "interface": 0}],
            "dns": {"nameservers": ["10.96.0.10"]}
        }))
        .expect("parses 0.4.0");
        let merged = prev.merge(sample());
        assert_eq!(merged.interfaces.len(), 2);
        assert_eq!(merged.ips[0].interface, Some(0));
        assert_eq!(merged.ips[1].interface, Some(1));
        assert_eq!(merged.dns["nameservers"][0], "10.96.0.10");
    }
}
