//! The relay's streaming and metadata paths against an in-test gRPC server
//! playing the runtime (containerd 1.6 has no GetContainerEvents and echoes
//! no metadata): events arrive in order, a client that stops reading stops
//! the server (HTTP/2 flow control end to end, nothing buffered without
//! bound), a client that goes away cancels the server's stream; request
//! metadata and grpc-timeout reach the server as sent, and status, message
//! and trailers come back unchanged; a dead runtime is UNAVAILABLE.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::GetEventsRequest;
use nodeplane_tests::containerd::connect_channel;
use nodeplane_tests::cri::server::{TestServer, PROBE};
use nodeplane_tests::cri::{raw, Shim};
use nodeplane_tests::TempDir;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};

const EVENTS: u64 = 2000;
const EVENT_SIZE: usize = 16 * 1024;

async fn until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_streams_events_in_order_with_back_pressure_and_cancellation() {
    let dir = TempDir::new("cristream");
    let server = TestServer::start(&dir.path().join("runtime.sock"), EVENTS, EVENT_SIZE);
    let shim = Shim::start(&server.socket, &["--no-inject"]);
    let mut cri =
        RuntimeServiceClient::new(shim.channel().await).max_decoding_message_size(1 << 20);

    let mut stream = cri
        .get_container_events(GetEventsRequest {})
        .await
        .expect("GetContainerEvents through the shim")
        .into_inner();
    let mut next = 0u64;
    for _ in 0..10 {
        let ev = stream
            .message()
            .await
            .expect("event")
            .expect("stream ended early");
        assert_eq!(ev.container_id, format!("c{next}"), "events out of order");
        next += 1;
    }
    // The client stops reading: the server must stall once the windows on
    // the way are full, far short of the whole stream.
    let stats = server.streams.lock().expect("lock")[0].clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = stats.produced.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = stats.produced.load(Ordering::Relaxed);
    println!(
        "server produced {stalled} of {EVENTS} events ({} KiB) while the client read 10",
        stalled * EVENT_SIZE as u64 / 1024
    );
    assert_eq!(
        stalled, later,
        "the server kept producing while nobody read: no back-pressure"
    );
    assert!(
        stalled < EVENTS / 2,
        "{stalled} of {EVENTS} events produced with 10 read: the relay buffers without bound"
    );
    // Reading resumes: everything arrives, in order, then the clean end.
    while let Some(ev) = stream.message().await.expect("event after resuming") {
        assert_eq!(
            ev.container_id,
            format!("c{next}"),
            "events out of order after resuming"
        );
        next += 1;
    }
    assert_eq!(next, EVENTS);
    until(
        "the server's stream to finish",
        Duration::from_secs(5),
        || stats.finished.load(Ordering::Relaxed),
    )
    .await;

    // Cancellation: the client drops the stream after a few events; the
    // server's side must see its stream go away (not run on into a buffer).
    let mut stream = cri
        .get_container_events(GetEventsRequest {})
        .await
        .expect("second stream")
        .into_inner();
    for i in 0..5 {
        let ev = stream.message().await.expect("event").expect("ended early");
        assert_eq!(ev.container_id, format!("c{i}"));
    }
    drop(stream);
    let stats = server.streams.lock().expect("lock")[1].clone();
    until(
        "the runtime's stream to be cancelled",
        Duration::from_secs(10),
        || stats.cancelled.load(Ordering::Relaxed),
    )
    .await;
    assert!(!stats.finished.load(Ordering::Relaxed));
    // The shim still serves after the cancellation.
    let mut again = cri
        .get_container_events(GetEventsRequest {})
        .await
        .expect("third stream")
        .into_inner();
    assert_eq!(
        again
            .message()
            .await
            .expect("event")
            .map(|e| e.container_id)
            .as_deref(),
        Some("c0")
    );
}

/// A probe call with metadata, a deadline and a wanted status.
fn probe_request(status: &str, message: &str) -> tonic::Request<Bytes> {
    let mut r = tonic::Request::new(Bytes::from_static(b"\x0a\x05hello\xfa\x07\x03new"));
    let m = r.metadata_mut();
    m.insert("x-test-trace", MetadataValue::from_static("abc-123"));
    m.append("x-test-multi", MetadataValue::from_static("one"));
    m.append("x-test-multi", MetadataValue::from_static("two"));
    m.insert_bin(
        "x-test-blob-bin",
        BinaryMetadataValue::from_bytes(&[0, 1, 2, 255]),
    );
    m.insert(
        "x-want-status",
        MetadataValue::try_from(status).expect("ascii"),
    );
    m.insert(
        "x-want-message",
        MetadataValue::try_from(message).expect("ascii"),
    );
    r.set_timeout(Duration::from_millis(7500));
    r
}

type Outcome = (String, Option<Bytes>, Vec<(String, String)>);

/// Code+message, body, and every x-echo-* entry, from either side.
fn outcome(r: Result<tonic::Response<Bytes>, tonic::Status>) -> Outcome {
    let echo = |m: &tonic::metadata::MetadataMap| -> Vec<(String, String)> {
        let mut v: Vec<_> = m
            .clone()
            .into_headers()
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-echo-"))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    match r {
        Ok(r) => ("OK".into(), Some(r.get_ref().clone()), echo(r.metadata())),
        Err(s) => (
            format!("{:?}: {}", s.code(), s.message()),
            None,
            echo(s.metadata()),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_shim_passes_metadata_deadline_status_and_trailers_unchanged() {
    let dir = TempDir::new("criprobe");
    let server = TestServer::start(&dir.path().join("runtime.sock"), 1, 1);
    let shim = Shim::start(&server.socket, &["--no-inject"]);
    let direct = connect_channel(server.socket.clone())
        .await
        .expect("connect test server");
    let via = shim.channel().await;

    let cases = [
        ("0", "", PROBE),
        ("9", "precondition failed: caf%C3%A9 100%25", PROBE),
        ("5", "no such thing", PROBE),
        ("0", "", "/runtime.v1.RuntimeService/NotYetInvented"),
        ("0", "", "/some.other.v9.Service/Method"),
    ];
    for (status, message, path) in cases {
        let d = outcome(raw::unary(direct.clone(), path, probe_request(status, message)).await);
        let s = outcome(raw::unary(via.clone(), path, probe_request(status, message)).await);
        assert_eq!(s, d, "{path} status {status}: through the shim vs direct");
        println!("{path}: {}", s.0);
        if path == PROBE {
            let keys: Vec<&str> = s.2.iter().map(|(k, _)| k.as_str()).collect();
            for k in [
                "x-echo-trace",
                "x-echo-multi",
                "x-echo-blob-bin",
                "x-echo-grpc-timeout",
            ] {
                assert!(
                    keys.contains(&k),
                    "{k} missing from what the runtime saw: {:?}",
                    s.2
                );
            }
            assert_eq!(
                s.2.iter().filter(|(k, _)| k == "x-echo-multi").count(),
                2,
                "both values of a repeated key"
            );
        }
    }

    // The runtime goes away: the shim answers UNAVAILABLE, naming it.
    let path = server.socket.clone();
    drop(server);
    let e = raw::unary(via.clone(), PROBE, probe_request("0", ""))
        .await
        .expect_err("runtime is gone");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&path.display().to_string()),
        "message should name the runtime socket: {e:?}"
    );
    assert!(
        shim.metric("nodeplane_cri_shim_errors_total{method=\"other\"}") >= 1.0,
        "{}",
        shim.metrics()
    );
}
