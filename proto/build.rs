//! Compiles proto/*.proto with prost-build (needs `protoc`, Debian package
//! protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    prost_build::compile_protos(&["proto/agent.proto"], &["proto/"])?;
    #[cfg(feature = "csi")]
    csi()?;
    Ok(())
}

/// CSI (proto/csi.proto) and the kubelet's plugin registration
/// (proto/pluginregistration.proto): messages plus tonic clients and servers.
#[cfg(feature = "csi")]
fn csi() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    println!("cargo:rerun-if-changed=proto/pluginregistration.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &["proto/csi.proto", "proto/pluginregistration.proto"],
            &["proto/"],
        )?;
    Ok(())
}
