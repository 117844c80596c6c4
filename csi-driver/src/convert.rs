//! Between the wire (csi.v1 messages) and the domain types. REQUIRED fields
//! are checked here, so a missing one is INVALID_ARGUMENT naming the field.

use std::collections::{BTreeMap, HashMap};

use nodeplane_proto::csi as pb;
use pb::volume_capability::access_mode::Mode;

use crate::model::*;
use crate::{Error, Result};

fn missing(field: &str) -> Error {
    Error::InvalidArgument(format!("{field} is required"))
}

pub fn required(v: &str, field: &str) -> Result<String> {
    if v.is_empty() {
        return Err(missing(field));
    }
    Ok(v.to_string())
}

/// A path argument: required and absolute.
pub fn path(v: &str, field: &str) -> Result<String> {
    let v = required(v, field)?;
    if !v.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "{field} `{v}` must be an absolute path"
        )));
    }
    Ok(v)
}

pub fn map(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn hmap(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn capability(c: &pb::VolumeCapability, field: &str) -> Result<Capability> {
    let mode = c
        .access_mode
        .as_ref()
        .ok_or_else(|| missing(&format!("{field}.access_mode")))?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "{field}.access_mode.mode {} is not a known access mode",
                mode.mode
            )))
        }
    };
    let access = match &c.access_type {
        None => return Err(missing(&format!("{field}.access_type (block or mount)"))),
        Some(pb::volume_capability::AccessType::Block(_)) => AccessType::Block,
        Some(pb::volume_capability::AccessType::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
            mount_group: if m.volume_mount_group.is_empty() {
                None
            } else {
                Some(m.volume_mount_group.parse().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "{field}.mount.volume_mount_group `{}` is not a numeric group id",
                        m.volume_mount_group
                    ))
                })?)
            },
        },
    };
    Ok(Capability { access, mode })
}

pub fn capabilities(cs: &[pb::VolumeCapability], field: &str) -> Result<Vec<Capability>> {
    cs.iter()
        .enumerate()
        .map(|(i, c)| capability(c, &format!("{field}[{i}]")))
        .collect()
}

pub fn range(r: Option<&pb::CapacityRange>) -> Result<CapacityRange> {
    let Some(r) = r else {
        return Ok(CapacityRange::default());
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range must not be negative (required_bytes {}, limit_bytes {})",
            r.required_bytes, r.limit_bytes
        )));
    }
    Ok(CapacityRange {
        required: r.required_bytes as u64,
        limit: r.limit_bytes as u64,
    })
}

pub fn source(s: Option<&pb::VolumeContentSource>) -> Result<Option<ContentSource>> {
    use pb::volume_content_source::Type;
    let Some(s) = s else { return Ok(None) };
    match &s.r#type {
        None => Err(missing("volume_content_source.type (snapshot or volume)")),
        Some(Type::Snapshot(x)) => Ok(Some(ContentSource::Snapshot(required(
            &x.snapshot_id,
            "volume_content_source.snapshot.snapshot_id",
        )?))),
        Some(Type::Volume(x)) => Ok(Some(ContentSource::Volume(required(
            &x.volume_id,
            "volume_content_source.volume.volume_id",
        )?))),
    }
}

pub fn source_pb(s: &Option<ContentSource>) -> Option<pb::VolumeContentSource> {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    s.as_ref().map(|s| pb::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    })
}

pub fn create_volume(r: &pb::CreateVolumeRequest) -> Result<CreateVolume> {
    let name = required(&r.name, "name")?;
    if r.volume_capabilities.is_empty() {
        return Err(missing("volume_capabilities"));
    }
    let topo = |ts: &[pb::Topology]| ts.iter().map(|t| map(&t.segments)).collect::<Vec<_>>();
    Ok(CreateVolume {
        name,
        capacity: range(r.capacity_range.as_ref())?,
        capabilities: capabilities(&r.volume_capabilities, "volume_capabilities")?,
        parameters: map(&r.parameters),
        source: source(r.volume_content_source.as_ref())?,
        requisite: r
            .accessibility_requirements
            .as_ref()
            .map(|a| topo(&a.requisite))
            .unwrap_or_default(),
        preferred: r
            .accessibility_requirements
            .as_ref()
            .map(|a| topo(&a.preferred))
            .unwrap_or_default(),
    })
}

pub fn volume(v: &VolumeInfo) -> pb::Volume {
    pb::Volume {
        capacity_bytes: v.capacity as i64,
        volume_id: v.id.clone(),
        volume_context: hmap(&v.context),
        content_source: source_pb(&v.source),
        accessible_topology: vec![pb::Topology {
            segments: hmap(&v.topology),
        }],
    }
}

pub fn condition(c: &Condition) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message.clone(),
    }
}

pub fn snapshot(s: &SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: (s.created_unix_nanos / 1_000_000_000) as i64,
            nanos: (s.created_unix_nanos % 1_000_000_000) as i32,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

pub fn list_filter(max_entries: i32, token: &str) -> Result<ListFilter> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(format!(
            "max_entries {max_entries} must not be negative"
        )));
    }
    Ok(ListFilter {
        max_entries: max_entries as usize,
        starting_token: (!token.is_empty()).then(|| token.to_string()),
        ..ListFilter::default()
    })
}

pub fn usage(u: &Usage) -> Vec<pb::VolumeUsage> {
    use pb::volume_usage::Unit;
    let mut out = vec![pb::VolumeUsage {
        available: u.bytes_available as i64,
        total: u.bytes_total as i64,
        used: u.bytes_used as i64,
        unit: Unit::Bytes as i32,
    }];
    if let Some((total, used, free)) = u.inodes {
        out.push(pb::VolumeUsage {
            available: free as i64,
            total: total as i64,
            used: used as i64,
            unit: Unit::Inodes as i32,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_name_themselves() {
        let r = pb::CreateVolumeRequest::default();
        let e = create_volume(&r).expect_err("no name");
        assert!(e.to_string().contains("name is required"), "{e}");
        let r = pb::CreateVolumeRequest {
            name: "a".into(),
            volume_capabilities: vec![pb::VolumeCapability::default()],
            ..Default::default()
        };
        let e = create_volume(&r).expect_err("no access mode");
        assert!(
            e.to_string().contains("volume_capabilities[0].access_mode"),
            "{e}"
        );
    }

    #[test]
    fn negative_capacity_is_invalid() {
        let e = range(Some(&pb::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        }))
        .expect_err("negative");
        assert!(matches!(e, Error::InvalidArgument(_)));
    }
}
