//! The kubelet's plugin-registration service (pluginregistration v1), so the
//! driver registers itself without a node-driver-registrar sidecar: the
//! kubelet finds `<registry>/<driver>-reg.sock`, calls GetInfo, then
//! NotifyRegistrationStatus with its verdict.

use nodeplane_proto::pluginregistration as pb;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct Registration {
    pub driver: String,
    /// The CSI socket path the kubelet should call.
    pub endpoint: String,
}

#[tonic::async_trait]
impl pb::registration_server::Registration for Registration {
    async fn get_info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        Ok(Response::new(pb::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec!["1.0.0".into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        r: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let r = r.into_inner();
        if r.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
        } else {
            tracing::error!(driver = %self.driver, error = %r.error, "the kubelet refused the registration");
        }
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}
