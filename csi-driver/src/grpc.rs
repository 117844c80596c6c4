//! The generic adapter: any `Identity + Controller + Node` implementation
//! served as the generated tonic services. Each call converts the request
//! (`convert`), runs the domain method on the blocking pool (it runs mkfs,
//! losetup and mount), and converts the answer or maps the error to the
//! spec's code (`impl From<Error> for Status`).

use std::sync::Arc;

use nodeplane_proto::csi as pb;
use pb::controller_service_capability::rpc::Type as CType;
use pb::node_service_capability::rpc::Type as NType;
use tonic::{Request, Response, Status};

use crate::convert::{self, path, required};
use crate::model::{CapacityQuery, CreateSnapshot, Expand, NodeExpand, Publish, Stage};
use crate::service::{Controller, Identity, Node};
use crate::Result;

/// The services of one driver.
#[derive(Debug)]
pub struct Csi<D>(pub Arc<D>);

impl<D> Clone for Csi<D> {
    fn clone(&self) -> Self {
        Csi(self.0.clone())
    }
}

impl<D: Send + Sync + 'static> Csi<D> {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&D) -> Result<T> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let d = self.0.clone();
        match tokio::task::spawn_blocking(move || f(&d)).await {
            Ok(Ok(v)) => Ok(Response::new(v)),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Status::internal(format!("driver task failed: {e}"))),
        }
    }
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl<D: Identity + Send + Sync + 'static> pb::identity_server::Identity for Csi<D> {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Res<pb::GetPluginInfoResponse> {
        let (name, vendor_version) = self.0.plugin_info();
        Ok(Response::new(pb::GetPluginInfoResponse {
            name,
            vendor_version,
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Res<pb::GetPluginCapabilitiesResponse> {
        use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let svc = |t: service::Type| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                svc(service::Type::ControllerService),
                svc(service::Type::VolumeAccessibilityConstraints),
                pb::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(&self, _: Request<pb::ProbeRequest>) -> Res<pb::ProbeResponse> {
        Ok(Response::new(pb::ProbeResponse {
            ready: Some(self.0.probe()),
        }))
    }
}

#[tonic::async_trait]
impl<D: Controller + Send + Sync + 'static> pb::controller_server::Controller for Csi<D> {
    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Res<pb::CreateVolumeResponse> {
        let req = convert::create_volume(r.get_ref())?;
        self.run(move |d| {
            d.create_volume(req).map(|v| pb::CreateVolumeResponse {
                volume: Some(convert::volume(&v)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Res<pb::DeleteVolumeResponse> {
        let id = required(&r.get_ref().volume_id, "volume_id")?;
        self.run(move |d| d.delete_volume(&id).map(|_| pb::DeleteVolumeResponse {}))
            .await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Res<pb::ControllerPublishVolumeResponse> {
        Err(Status::unimplemented(
            "node-local volumes need no attach: PUBLISH_UNPUBLISH_VOLUME is not offered",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Res<pb::ControllerUnpublishVolumeResponse> {
        Err(Status::unimplemented(
            "node-local volumes need no attach: PUBLISH_UNPUBLISH_VOLUME is not offered",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Res<pb::ValidateVolumeCapabilitiesResponse> {
        let r = r.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let caps = convert::capabilities(&r.volume_capabilities, "volume_capabilities")?;
        let (ctx, params) = (convert::map(&r.volume_context), convert::map(&r.parameters));
        self.run(move |d| {
            d.validate_capabilities(&id, &ctx, &caps, &params)
                .map(|why| match why {
                    None => pb::ValidateVolumeCapabilitiesResponse {
                        confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                            volume_context: r.volume_context,
                            volume_capabilities: r.volume_capabilities,
                            parameters: r.parameters,
                        }),
                        message: String::new(),
                    },
                    Some(m) => pb::ValidateVolumeCapabilitiesResponse {
                        confirmed: None,
                        message: m,
                    },
                })
        })
        .await
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Res<pb::ListVolumesResponse> {
        let f = convert::list_filter(r.get_ref().max_entries, &r.get_ref().starting_token)?;
        self.run(move |d| {
            d.list_volumes(f).map(|p| pb::ListVolumesResponse {
                entries: p
                    .entries
                    .iter()
                    .map(|s| pb::list_volumes_response::Entry {
                        volume: Some(convert::volume(&s.volume)),
                        status: Some(pb::list_volumes_response::VolumeStatus {
                            published_node_ids: s.published_nodes.clone(),
                            volume_condition: Some(convert::condition(&s.condition)),
                        }),
                    })
                    .collect(),
                next_token: p.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        r: Request<pb::GetCapacityRequest>,
    ) -> Res<pb::GetCapacityResponse> {
        let r = r.into_inner();
        let q = CapacityQuery {
            capabilities: convert::capabilities(&r.volume_capabilities, "volume_capabilities")?,
            parameters: convert::map(&r.parameters),
            topology: r.accessible_topology.map(|t| convert::map(&t.segments)),
        };
        self.run(move |d| {
            d.capacity(q).map(|c| pb::GetCapacityResponse {
                available_capacity: c.available as i64,
                maximum_volume_size: Some(c.maximum_volume_size as i64),
                minimum_volume_size: Some(c.minimum_volume_size as i64),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Res<pb::ControllerGetCapabilitiesResponse> {
        use pb::controller_service_capability::{Rpc, Type};
        let caps = [
            CType::CreateDeleteVolume,
            CType::ListVolumes,
            CType::GetCapacity,
            CType::CreateDeleteSnapshot,
            CType::ListSnapshots,
            CType::CloneVolume,
            CType::ExpandVolume,
            CType::VolumeCondition,
            CType::GetVolume,
            CType::SingleNodeMultiWriter,
        ];
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|t| pb::ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Res<pb::CreateSnapshotResponse> {
        let r = r.get_ref();
        let req = CreateSnapshot {
            source_volume: required(&r.source_volume_id, "source_volume_id")?,
            name: required(&r.name, "name")?,
            parameters: convert::map(&r.parameters),
        };
        self.run(move |d| {
            d.create_snapshot(req).map(|s| pb::CreateSnapshotResponse {
                snapshot: Some(convert::snapshot(&s)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Res<pb::DeleteSnapshotResponse> {
        let id = required(&r.get_ref().snapshot_id, "snapshot_id")?;
        self.run(move |d| {
            d.delete_snapshot(&id)
                .map(|_| pb::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Res<pb::ListSnapshotsResponse> {
        let r = r.get_ref();
        let mut f = convert::list_filter(r.max_entries, &r.starting_token)?;
        f.source_volume = (!r.source_volume_id.is_empty()).then(|| r.source_volume_id.clone());
        f.snapshot_id = (!r.snapshot_id.is_empty()).then(|| r.snapshot_id.clone());
        self.run(move |d| {
            d.list_snapshots(f).map(|p| pb::ListSnapshotsResponse {
                entries: p
                    .entries
                    .iter()
                    .map(|s| pb::list_snapshots_response::Entry {
                        snapshot: Some(convert::snapshot(s)),
                    })
                    .collect(),
                next_token: p.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        r: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Res<pb::ControllerExpandVolumeResponse> {
        let r = r.get_ref();
        let req = Expand {
            volume_id: required(&r.volume_id, "volume_id")?,
            capacity: match &r.capacity_range {
                None => return Err(Status::invalid_argument("capacity_range is required")),
                Some(c) => convert::range(Some(c))?,
            },
            capability: r
                .volume_capability
                .as_ref()
                .map(|c| convert::capability(c, "volume_capability"))
                .transpose()?,
        };
        self.run(move |d| {
            d.expand_volume(req)
                .map(|e| pb::ControllerExpandVolumeResponse {
                    capacity_bytes: e.capacity as i64,
                    node_expansion_required: e.node_expansion_required,
                })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        r: Request<pb::ControllerGetVolumeRequest>,
    ) -> Res<pb::ControllerGetVolumeResponse> {
        let id = required(&r.get_ref().volume_id, "volume_id")?;
        self.run(move |d| {
            d.get_volume(&id).map(|s| pb::ControllerGetVolumeResponse {
                volume: Some(convert::volume(&s.volume)),
                status: Some(pb::controller_get_volume_response::VolumeStatus {
                    published_node_ids: s.published_nodes.clone(),
                    volume_condition: Some(convert::condition(&s.condition)),
                }),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl<D: Node + Send + Sync + 'static> pb::node_server::Node for Csi<D> {
    async fn node_stage_volume(
        &self,
        r: Request<pb::NodeStageVolumeRequest>,
    ) -> Res<pb::NodeStageVolumeResponse> {
        let r = r.get_ref();
        let req = Stage {
            volume_id: required(&r.volume_id, "volume_id")?,
            staging_path: path(&r.staging_target_path, "staging_target_path")?,
            capability: convert::capability(
                r.volume_capability
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?,
                "volume_capability",
            )?,
            context: convert::map(&r.volume_context),
        };
        self.run(move |d| d.stage(req).map(|_| pb::NodeStageVolumeResponse {}))
            .await
    }

    async fn node_unstage_volume(
        &self,
        r: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Res<pb::NodeUnstageVolumeResponse> {
        let id = required(&r.get_ref().volume_id, "volume_id")?;
        let p = path(&r.get_ref().staging_target_path, "staging_target_path")?;
        self.run(move |d| d.unstage(&id, &p).map(|_| pb::NodeUnstageVolumeResponse {}))
            .await
    }

    async fn node_publish_volume(
        &self,
        r: Request<pb::NodePublishVolumeRequest>,
    ) -> Res<pb::NodePublishVolumeResponse> {
        let r = r.get_ref();
        let req = Publish {
            volume_id: required(&r.volume_id, "volume_id")?,
            staging_path: (!r.staging_target_path.is_empty())
                .then(|| r.staging_target_path.clone()),
            target_path: path(&r.target_path, "target_path")?,
            capability: convert::capability(
                r.volume_capability
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?,
                "volume_capability",
            )?,
            readonly: r.readonly,
            context: convert::map(&r.volume_context),
        };
        self.run(move |d| d.publish(req).map(|_| pb::NodePublishVolumeResponse {}))
            .await
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Res<pb::NodeUnpublishVolumeResponse> {
        let id = required(&r.get_ref().volume_id, "volume_id")?;
        let t = path(&r.get_ref().target_path, "target_path")?;
        self.run(move |d| {
            d.unpublish(&id, &t)
                .map(|_| pb::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Res<pb::NodeGetVolumeStatsResponse> {
        let id = required(&r.get_ref().volume_id, "volume_id")?;
        let p = path(&r.get_ref().volume_path, "volume_path")?;
        self.run(move |d| {
            d.stats(&id, &p).map(|s| pb::NodeGetVolumeStatsResponse {
                usage: convert::usage(&s.usage),
                volume_condition: Some(convert::condition(&s.condition)),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        r: Request<pb::NodeExpandVolumeRequest>,
    ) -> Res<pb::NodeExpandVolumeResponse> {
        let r = r.get_ref();
        let req = NodeExpand {
            volume_id: required(&r.volume_id, "volume_id")?,
            volume_path: path(&r.volume_path, "volume_path")?,
            capacity: convert::range(r.capacity_range.as_ref())?,
            staging_path: (!r.staging_target_path.is_empty())
                .then(|| r.staging_target_path.clone()),
        };
        self.run(move |d| {
            d.expand(req).map(|c| pb::NodeExpandVolumeResponse {
                capacity_bytes: c as i64,
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Res<pb::NodeGetCapabilitiesResponse> {
        use pb::node_service_capability::{Rpc, Type};
        let caps = [
            NType::StageUnstageVolume,
            NType::GetVolumeStats,
            NType::ExpandVolume,
            NType::VolumeCondition,
            NType::SingleNodeMultiWriter,
            NType::VolumeMountGroup,
        ];
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|t| pb::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Res<pb::NodeGetInfoResponse> {
        let i = self.0.info();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: i.node_id,
            max_volumes_per_node: i.max_volumes as i64,
            accessible_topology: Some(pb::Topology {
                segments: convert::hmap(&i.topology),
            }),
        }))
    }
}
