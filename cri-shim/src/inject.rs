//! Injection at CreateContainer: the node runtime's socket directory as a
//! read-only bind mount, and environment variables naming the socket and the
//! pod's identity.
//!
//! The request is never re-encoded. prost drops fields it does not know, so
//! decoding and encoding a newer kubelet's request would lose them. Instead
//! the additions are appended to the original bytes as a second occurrence
//! of `CreateContainerRequest.config` (field 2) holding only `envs` (field 6)
//! and `mounts` (field 7) of `ContainerConfig`. The protobuf encoding spec
//! says a parser merges repeated occurrences of an embedded message field,
//! and repeated fields of the merged messages are concatenated
//! ("Last One Wins" applies only to scalars), so the runtime sees the
//! original config plus our entries, and every other byte exactly as the
//! kubelet sent it. Field numbers from kubernetes/cri-api api.proto.

use k8s_cri::v1::{ContainerConfig, CreateContainerRequest, KeyValue, Mount, PodSandboxConfig};
use prost::Message;

use crate::config::Injection;
use crate::{Error, Result};

/// Pod annotation that turns injection off for a pod: `nodeplane.io/inject: "false"`.
pub const OPT_OUT_ANNOTATION: &str = "nodeplane.io/inject";

/// Environment variables injected (the names are the contract with pods).
pub const ENV_SOCKET: &str = "NODEPLANE_RUNTIME_SOCKET";
pub const ENV_NAMESPACE: &str = "NODEPLANE_POD_NAMESPACE";
pub const ENV_NAME: &str = "NODEPLANE_POD_NAME";
pub const ENV_UID: &str = "NODEPLANE_POD_UID";
pub const ENV_APP_ID: &str = "NODEPLANE_APP_ID";
/// What Dapr SDKs read to find the runtime (Go, Java, .NET and Python
/// take the endpoint; JavaScript and older SDKs host and port), and the
/// app id Dapr's injector gives app containers.
pub const ENV_DAPR_ENDPOINT: &str = "DAPR_HTTP_ENDPOINT";
pub const ENV_DAPR_HOST: &str = "DAPR_HOST";
pub const ENV_DAPR_RUNTIME_HOST: &str = "DAPR_RUNTIME_HOST";
pub const ENV_DAPR_PORT: &str = "DAPR_HTTP_PORT";
pub const ENV_DAPR_APP_ID: &str = "APP_ID";

/// `CreateContainerRequest.config`.
const FIELD_CONFIG: u32 = 2;
/// Protobuf wire type of length-delimited fields.
const WIRE_LEN: u32 = 2;

/// The app id of a pod: annotation `dapr.io/app-id` (what Dapr users
/// already set), else label `app.kubernetes.io/name`, else label `app`.
pub fn app_id(sandbox: &PodSandboxConfig) -> Option<&str> {
    sandbox
        .annotations
        .get("dapr.io/app-id")
        .or_else(|| sandbox.labels.get("app.kubernetes.io/name"))
        .or_else(|| sandbox.labels.get("app"))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// True unless the pod opted out with `nodeplane.io/inject: "false"`.
pub fn wanted(sandbox: &PodSandboxConfig) -> bool {
    !sandbox
        .annotations
        .get(OPT_OUT_ANNOTATION)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

/// The decoded request (read only, to learn the pod and what the container
/// already sets).
pub fn decode(msg: &[u8]) -> Result<CreateContainerRequest> {
    CreateContainerRequest::decode(msg).map_err(|e| Error::malformed("CreateContainerRequest", e))
}

/// The additions for one container: env vars the container does not set
/// itself (its own value wins), and the mount unless the container already
/// mounts something at that path.
pub fn additions(inj: &Injection, req: &CreateContainerRequest) -> ContainerConfig {
    let empty = ContainerConfig::default();
    let config = req.config.as_ref().unwrap_or(&empty);
    let sandbox = req.sandbox_config.clone().unwrap_or_default();
    let meta = sandbox.metadata.clone().unwrap_or_default();
    let mut envs = vec![
        (ENV_SOCKET, inj.socket_in_container()),
        (ENV_NAMESPACE, meta.namespace.clone()),
        (ENV_NAME, meta.name.clone()),
        (ENV_UID, meta.uid.clone()),
    ];
    let (host, port) = inj
        .http_address
        .rsplit_once(':')
        .unwrap_or((inj.http_address.as_str(), ""));
    envs.extend([
        (ENV_DAPR_ENDPOINT, format!("http://{}", inj.http_address)),
        (ENV_DAPR_HOST, host.to_string()),
        (ENV_DAPR_RUNTIME_HOST, host.to_string()),
        (ENV_DAPR_PORT, port.to_string()),
    ]);
    if let Some(id) = app_id(&sandbox) {
        envs.push((ENV_APP_ID, id.to_string()));
        envs.push((ENV_DAPR_APP_ID, id.to_string()));
    }
    let envs = envs
        .into_iter()
        .filter(|(k, v)| !v.is_empty() && !config.envs.iter().any(|e| e.key == *k))
        .map(|(k, v)| KeyValue {
            key: k.to_string(),
            value: v,
        })
        .collect();
    let container_path = inj.container_dir.display().to_string();
    let mounts = if config
        .mounts
        .iter()
        .any(|m| m.container_path == container_path)
    {
        Vec::new()
    } else {
        vec![Mount {
            container_path,
            host_path: inj.host_dir.display().to_string(),
            // connect(2) on a socket works through a read-only mount; the
            // pod must not be able to replace the runtime's socket.
            readonly: true,
            ..Default::default()
        }]
    };
    ContainerConfig {
        envs,
        mounts,
        ..Default::default()
    }
}

/// `msg` (an encoded CreateContainerRequest) with `extra` merged into its
/// `config`, by appending; `None` when there is nothing to add. The result
/// starts with `msg` byte for byte.
pub fn splice(msg: &[u8], extra: &ContainerConfig) -> Option<Vec<u8>> {
    if extra.envs.is_empty() && extra.mounts.is_empty() {
        return None;
    }
    let extra = extra.encode_to_vec();
    let mut out = Vec::with_capacity(msg.len() + extra.len() + 6);
    out.extend_from_slice(msg);
    prost::encoding::encode_varint(u64::from(FIELD_CONFIG << 3 | WIRE_LEN), &mut out);
    prost::encoding::encode_varint(extra.len() as u64, &mut out);
    out.extend_from_slice(&extra);
    Some(out)
}

/// Decides and applies injection for one CreateContainer message: the
/// rewritten message, or `None` to relay the original.
pub fn rewrite(inj: &Injection, msg: &[u8], req: &CreateContainerRequest) -> Option<Vec<u8>> {
    let sandbox = req.sandbox_config.as_ref()?;
    if !wanted(sandbox) {
        return None;
    }
    splice(msg, &additions(inj, req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{ContainerMetadata, ImageSpec, PodSandboxMetadata};
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn inj() -> Injection {
        Injection {
            host_dir: PathBuf::from("/run/nodeplane/runtime"),
            container_dir: PathBuf::from("/var/run/nodeplane"),
            socket_name: "runtime.sock".into(),
            http_address: "169.254.1.1:3500".into(),
        }
    }

    fn sandbox(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> PodSandboxConfig {
        let map = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "web-0".into(),
                uid: "uid-1".into(),
                namespace: "shop".into(),
                attempt: 0,
            }),
            annotations: map(annotations),
            labels: map(labels),
            ..Default::default()
        }
    }

    fn container() -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 1,
            }),
            image: Some(ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            envs: vec![KeyValue {
                key: "USER_VAR".into(),
                value: "1".into(),
            }],
            mounts: vec![Mount {
                container_path: "/data".into(),
                host_path: "/srv/data".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn key(field: u32, wire: u32) -> Vec<u8> {
        let mut b = Vec::new();
        prost::encoding::encode_varint(u64::from(field << 3 | wire), &mut b);
        b
    }

    fn len_field(field: u32, data: &[u8]) -> Vec<u8> {
        let mut b = key(field, WIRE_LEN);
        prost::encoding::encode_varint(data.len() as u64, &mut b);
        b.extend_from_slice(data);
        b
    }

    /// A request as a newer kubelet might send it: an unknown field inside
    /// ContainerConfig (99) and one at the top level (98), which prost
    /// would drop on a decode/encode round trip.
    fn request_with_unknown_fields(sb: &PodSandboxConfig) -> Vec<u8> {
        let mut config = container().encode_to_vec();
        config.extend(len_field(99, b"future config field"));
        let mut msg = CreateContainerRequest {
            pod_sandbox_id: "sb-1".into(),
            config: None,
            sandbox_config: Some(sb.clone()),
        }
        .encode_to_vec();
        msg.extend(len_field(2, &config));
        msg.extend(key(98, 0));
        msg.push(42);
        msg
    }

    /// Top-level (field number, payload) pairs of a length-delimited-only
    /// or varint message, by hand, to see what is on the wire.
    fn fields(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let k = prost::encoding::decode_varint(&mut b).expect("key");
            let (field, wire) = ((k >> 3) as u32, (k & 7) as u32);
            match wire {
                0 => {
                    let v = prost::encoding::decode_varint(&mut b).expect("varint");
                    out.push((field, v.to_le_bytes().to_vec()));
                }
                2 => {
                    let n = prost::encoding::decode_varint(&mut b).expect("len") as usize;
                    out.push((field, b[..n].to_vec()));
                    b = &b[n..];
                }
                w => panic!("unexpected wire type {w}"),
            }
        }
        out
    }

    #[test]
    fn splice_keeps_every_original_byte_and_merges_per_the_protobuf_spec() {
        let sb = sandbox(&[("dapr.io/app-id", "cart")], &[("app", "ignored")]);
        let msg = request_with_unknown_fields(&sb);
        let req = decode(&msg).expect("decode");
        let out = rewrite(&inj(), &msg, &req).expect("injected");

        // Nothing of the original is lost or moved: it is a prefix.
        assert!(out.starts_with(&msg));
        let top = fields(&out);
        assert!(
            top.iter().any(|(f, _)| *f == 98),
            "top-level unknown field kept"
        );
        let configs: Vec<_> = top.iter().filter(|(f, _)| *f == 2).collect();
        assert_eq!(configs.len(), 2, "original config and ours");
        assert!(
            fields(&configs[0].1).iter().any(|(f, _)| *f == 99),
            "config's unknown field kept"
        );
        // Ours holds only envs (6) and mounts (7).
        assert!(fields(&configs[1].1)
            .iter()
            .all(|(f, _)| *f == 6 || *f == 7));

        // A spec-conforming parser (prost here, Go's in containerd) merges.
        let merged = CreateContainerRequest::decode(out.as_slice()).expect("decode merged");
        let c = merged.config.expect("config");
        assert_eq!(c.metadata.map(|m| m.name).as_deref(), Some("app"));
        assert_eq!(c.image.map(|i| i.image).as_deref(), Some("busybox"));
        let env: HashMap<_, _> = c
            .envs
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env["USER_VAR"], "1");
        assert_eq!(env[ENV_SOCKET], "/var/run/nodeplane/runtime.sock");
        assert_eq!(env[ENV_NAMESPACE], "shop");
        assert_eq!(env[ENV_NAME], "web-0");
        assert_eq!(env[ENV_UID], "uid-1");
        assert_eq!(env[ENV_APP_ID], "cart");
        assert_eq!(env[ENV_DAPR_ENDPOINT], "http://169.254.1.1:3500");
        assert_eq!(
            (env[ENV_DAPR_HOST], env[ENV_DAPR_PORT]),
            ("169.254.1.1", "3500")
        );
        assert_eq!(env[ENV_DAPR_APP_ID], "cart");
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.mounts[0].container_path, "/data");
        let m = &c.mounts[1];
        assert_eq!(
            (m.host_path.as_str(), m.container_path.as_str(), m.readonly),
            ("/run/nodeplane/runtime", "/var/run/nodeplane", true)
        );
        assert_eq!(merged.pod_sandbox_id, "sb-1");
    }

    #[test]
    fn opt_out_annotation_leaves_the_request_alone() {
        let sb = sandbox(&[(OPT_OUT_ANNOTATION, "False")], &[]);
        let msg = request_with_unknown_fields(&sb);
        assert_eq!(rewrite(&inj(), &msg, &decode(&msg).expect("decode")), None);
        let sb = sandbox(&[(OPT_OUT_ANNOTATION, "true")], &[]);
        let msg = request_with_unknown_fields(&sb);
        assert!(rewrite(&inj(), &msg, &decode(&msg).expect("decode")).is_some());
    }

    #[test]
    fn no_sandbox_config_means_no_identity_and_no_injection() {
        let msg = CreateContainerRequest {
            pod_sandbox_id: "sb".into(),
            config: Some(container()),
            sandbox_config: None,
        }
        .encode_to_vec();
        assert_eq!(rewrite(&inj(), &msg, &decode(&msg).expect("decode")), None);
    }

    #[test]
    fn the_containers_own_settings_win() {
        let sb = sandbox(&[], &[("app.kubernetes.io/name", "web"), ("app", "other")]);
        let mut c = container();
        c.envs.push(KeyValue {
            key: ENV_NAME.into(),
            value: "mine".into(),
        });
        c.mounts.push(Mount {
            container_path: "/var/run/nodeplane".into(),
            host_path: "/elsewhere".into(),
            ..Default::default()
        });
        let req = CreateContainerRequest {
            pod_sandbox_id: "sb".into(),
            config: Some(c),
            sandbox_config: Some(sb),
        };
        let extra = additions(&inj(), &req);
        assert!(
            extra.mounts.is_empty(),
            "the container's own mount at that path stays"
        );
        let keys: Vec<_> = extra.envs.iter().map(|e| e.key.as_str()).collect();
        assert!(!keys.contains(&ENV_NAME), "{keys:?}");
        let app = extra
            .envs
            .iter()
            .find(|e| e.key == ENV_APP_ID)
            .map(|e| e.value.as_str());
        assert_eq!(app, Some("web"), "app.kubernetes.io/name before app");
    }

    #[test]
    fn app_id_falls_back_to_the_app_label_then_none() {
        assert_eq!(app_id(&sandbox(&[], &[("app", "a")])), Some("a"));
        assert_eq!(app_id(&sandbox(&[], &[])), None);
        let req = CreateContainerRequest {
            sandbox_config: Some(sandbox(&[], &[])),
            ..Default::default()
        };
        assert!(additions(&inj(), &req)
            .envs
            .iter()
            .all(|e| e.key != ENV_APP_ID));
    }

    #[test]
    fn malformed_requests_are_named() {
        let e = decode(&[0x12, 0xff])
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("CreateContainerRequest"), "{e}");
    }
}
