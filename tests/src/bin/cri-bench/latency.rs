//! Per-call latency of four unary calls, direct and through the shim,
//! interleaved (direct, shim, direct, shim, ...) on one connection each,
//! as the kubelet uses one connection.

use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerStatusRequest, ImageSpec, ImageStatusRequest, ListContainersRequest, VersionRequest,
};
use nodeplane_tests::containerd::PAUSE_IMAGE;
use tonic::transport::Channel;

use crate::stats::{ms, p99_added_interval, quantile};
use crate::Opts;

#[derive(Clone, Copy, Debug)]
pub enum Method {
    Version,
    ListContainers,
    ContainerStatus,
    ImageStatus,
}

/// The four unary calls timed.
pub const METHODS: [Method; 4] = [
    Method::Version,
    Method::ListContainers,
    Method::ContainerStatus,
    Method::ImageStatus,
];

pub async fn call(m: Method, ch: &Channel, container: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    match m {
        Method::Version => {
            RuntimeServiceClient::new(ch.clone())
                .version(VersionRequest::default())
                .await?;
        }
        Method::ListContainers => {
            let r = RuntimeServiceClient::new(ch.clone())
                .list_containers(ListContainersRequest { filter: None })
                .await?;
            anyhow::ensure!(!r.get_ref().containers.is_empty(), "no containers listed");
        }
        Method::ContainerStatus => {
            let req = ContainerStatusRequest {
                container_id: container.into(),
                verbose: false,
            };
            RuntimeServiceClient::new(ch.clone())
                .container_status(req)
                .await?;
        }
        Method::ImageStatus => {
            let req = ImageStatusRequest {
                image: Some(ImageSpec {
                    image: PAUSE_IMAGE.into(),
                    ..Default::default()
                }),
                verbose: false,
            };
            ImageServiceClient::new(ch.clone())
                .image_status(req)
                .await?;
        }
    }
    Ok(t.elapsed())
}

/// Prints the table; returns the worst p99 added, in ms.
pub async fn run(o: &Opts, direct: Channel, shim: Channel, container: &str) -> anyhow::Result<f64> {
    println!(
        "latency per call ({} calls per method and path, interleaved; ms; the interval is a bootstrap of both paths' samples)",
        o.iterations
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}  p99 added, 90% interval",
        "method", "p50 dir", "p50 shim", "p99 dir", "p99 shim", "p50 added", "p99 added",
    );
    let mut worst = f64::MIN;
    let mut spread = Vec::new();
    for m in METHODS {
        for _ in 0..100 {
            call(m, &direct, container).await?;
            call(m, &shim, container).await?;
        }
        let (mut d, mut s) = (
            Vec::with_capacity(o.iterations),
            Vec::with_capacity(o.iterations),
        );
        for i in 0..o.iterations {
            // Alternate which goes first, so neither always follows the other.
            if i % 2 == 0 {
                d.push(call(m, &direct, container).await?);
                s.push(call(m, &shim, container).await?);
            } else {
                s.push(call(m, &shim, container).await?);
                d.push(call(m, &direct, container).await?);
            }
        }
        spread.push((m, blocks(&d, &s)));
        let (lo, hi) = p99_added_interval(&d, &s, 200);
        d.sort_unstable();
        s.sort_unstable();
        let (d50, s50, d99, s99) = (
            ms(quantile(&d, 0.5)),
            ms(quantile(&s, 0.5)),
            ms(quantile(&d, 0.99)),
            ms(quantile(&s, 0.99)),
        );
        worst = worst.max(s99 - d99);
        println!(
            "{:<16} {d50:>9.3} {s50:>9.3} {d99:>9.3} {s99:>9.3} {:>10.3} {:>10.3}  {lo:.3} to {hi:.3}",
            format!("{m:?}"),
            s50 - d50,
            s99 - d99
        );
    }
    // The same samples cut into five consecutive blocks: how much the p99
    // added moves with the machine's load over the run.
    println!("p99 added in each fifth of the run (ms):");
    for (m, b) in spread {
        let b: Vec<String> = b.iter().map(|v| format!("{v:.3}")).collect();
        println!("  {:<16} {}", format!("{m:?}"), b.join(" "));
    }
    Ok(worst)
}

fn blocks(d: &[Duration], s: &[Duration]) -> Vec<f64> {
    let n = (d.len() / 5).max(1);
    d.chunks(n)
        .zip(s.chunks(n))
        .map(|(d, s)| {
            let (mut d, mut s) = (d.to_vec(), s.to_vec());
            d.sort_unstable();
            s.sort_unstable();
            ms(quantile(&s, 0.99)) - ms(quantile(&d, 0.99))
        })
        .collect()
}
