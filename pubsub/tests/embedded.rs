//! The embedded broker across restarts: kill -9 of a publishing process
//! loses no acknowledged message; kill -9 of a subscribing process loses
//! no unacked delivery; a clean reopen keeps acks, nack delays and the
//! lock; a torn tail is repaired; acked segments are trimmed.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeplane_pubsub::{Broker, Subscription};
use support::{maybe_next, message, next, spec, TempDir};

/// Set (to a state dir) only in the children the kill tests start.
const PUBLISHER_ENV: &str = "NODEPLANE_PUBSUB_TEST_PUBLISHER_DIR";
const RECEIVER_ENV: &str = "NODEPLANE_PUBSUB_TEST_RECEIVER_DIR";

async fn open(dir: &Path, name: &str, metadata: &[(&str, &str)]) -> Arc<dyn Broker> {
    nodeplane_pubsub::open(&spec(name, "pubsub.embedded", metadata), dir)
        .await
        .unwrap_or_else(|e| panic!("open {name} in {}: {e}", dir.display()))
}

/// Every delivery until none comes for `quiet`, acked.
async fn drain(sub: &mut Box<dyn Subscription>, quiet: Duration) -> Vec<(String, u32)> {
    let mut got = Vec::new();
    while let Some(d) = maybe_next(sub, quiet).await {
        got.push((d.msg.id.clone(), d.attempt));
        d.token.ack().await.expect("ack");
    }
    got
}

fn spawn_child(test: &str, env: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// The publisher half of `kill9_keeps_acknowledged`: a no-op unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_child() {
    let Some(dir) = std::env::var_os(PUBLISHER_ENV) else {
        return;
    };
    let b = open(dir.as_ref(), "durable", &[]).await;
    // The harness's "test ... " has no newline yet: end that line first.
    println!();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    // Several publishers at once: their records share writes and fsyncs.
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (b, out) = (b.clone(), out.clone());
            tokio::spawn(async move {
                for i in 0..1_000_000u32 {
                    let id = format!("p{t}-{i}");
                    b.publish(message("crash", &id, &"x".repeat(1000)))
                        .await
                        .expect("publish");
                    let mut o = out.lock().expect("stdout");
                    writeln!(o, "ack {id}").expect("stdout");
                    o.flush().expect("flush");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_acknowledged() {
    let dir = TempDir::new("kill9-pub");
    // The group exists before the publishes (a new group sees new messages).
    {
        let b = open(dir.path(), "durable", &[]).await;
        b.subscribe("crash", "app")
            .await
            .expect("subscribe")
            .close()
            .await
            .expect("close");
    }
    let mut child = spawn_child("publisher_child", PUBLISHER_ENV, dir.path());
    let mut lines = BufReader::new(child.stdout.take().expect("child stdout")).lines();
    let mut acked: Vec<String> = Vec::new();
    let start = Instant::now();
    while acked.len() < 600 && start.elapsed() < Duration::from_secs(30) {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(id) = line.strip_prefix("ack ") {
                    acked.push(id.to_owned());
                }
            }
            _ => break,
        }
    }
    child.kill().expect("SIGKILL the publisher");
    let status = child.wait().expect("wait publisher");
    assert!(
        !status.success(),
        "the publisher was killed, not finished: {status}"
    );
    // Acknowledgements already in the pipe were given before the kill.
    for line in lines.map_while(Result::ok) {
        if let Some(id) = line.strip_prefix("ack ") {
            acked.push(id.to_owned());
        }
    }
    assert!(
        acked.len() >= 100,
        "only {} publishes acknowledged",
        acked.len()
    );

    let b = open(dir.path(), "durable", &[]).await;
    let mut sub = b
        .subscribe("crash", "app")
        .await
        .expect("subscribe after kill -9");
    let got = drain(&mut sub, Duration::from_secs(2)).await;
    let delivered: HashSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !delivered.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "kill -9 after {} acknowledged publishes: none lost ({} delivered, the rest written but not yet acknowledged)",
        acked.len(),
        got.len()
    );
}

/// The receiving half of `kill9_redelivers_unacked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_child() {
    let Some(dir) = std::env::var_os(RECEIVER_ENV) else {
        return;
    };
    let b = open(dir.as_ref(), "inflight", &[]).await;
    let mut sub = b.subscribe("work", "app").await.expect("subscribe");
    let mut held = Vec::new();
    let mut out = std::io::stdout();
    // The harness's "test ... " has no newline yet: end that line first.
    writeln!(out).expect("stdout");
    for i in 0..3 {
        let d = next(&mut sub, "child").await;
        writeln!(out, "got {}", d.msg.id).expect("stdout");
        if i == 0 {
            d.token.ack().await.expect("ack");
            writeln!(out, "acked {}", d.msg.id).expect("stdout");
        } else {
            held.push(d.token);
        }
    }
    // Long enough for a checkpoint (100 ms) to record the deliveries and
    // the ack; the parent's assertions do not depend on it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    writeln!(out, "holding").expect("stdout");
    out.flush().expect("flush");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_redelivers_unacked() {
    let dir = TempDir::new("kill9-sub");
    let ids: Vec<String> = (0..5).map(|i| format!("w-{i}")).collect();
    {
        let b = open(dir.path(), "inflight", &[]).await;
        let sub = b.subscribe("work", "app").await.expect("subscribe");
        for id in &ids {
            b.publish(message("work", id, "job"))
                .await
                .expect("publish");
        }
        sub.close().await.expect("close");
    }
    let mut child = spawn_child("receiver_child", RECEIVER_ENV, dir.path());
    let mut got = Vec::new();
    let mut acked = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("child stdout")).lines() {
        let line = line.expect("child output");
        if let Some(id) = line.strip_prefix("got ") {
            got.push(id.to_owned());
        } else if let Some(id) = line.strip_prefix("acked ") {
            acked.push(id.to_owned());
        } else if line == "holding" {
            break;
        }
    }
    child.kill().expect("SIGKILL the receiver");
    let _ = child.wait();
    assert_eq!(got.len(), 3, "the child took three deliveries: {got:?}");

    let b = open(dir.path(), "inflight", &[]).await;
    let mut sub = b
        .subscribe("work", "app")
        .await
        .expect("subscribe after kill -9");
    let again = drain(&mut sub, Duration::from_secs(1)).await;
    let again_ids: HashSet<&str> = again.iter().map(|(id, _)| id.as_str()).collect();
    // Everything not acked comes (again): the two held and the two never taken.
    for id in ids.iter().filter(|id| !acked.contains(id)) {
        assert!(
            again_ids.contains(id.as_str()),
            "{id} lost: redelivered {again:?}"
        );
    }
    eprintln!("after kill -9 with deliveries held: redelivered {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_reopen_keeps_acks_delays_and_lock() {
    let dir = TempDir::new("reopen");
    {
        let b = open(dir.path(), "reopen", &[]).await;
        let twice =
            nodeplane_pubsub::open(&spec("reopen", "pubsub.embedded", &[]), dir.path()).await;
        assert!(twice.is_err(), "the directory is locked while open");
        let mut sub = b.subscribe("jobs", "app").await.expect("subscribe");
        for id in ["acked", "nacked", "inflight"] {
            b.publish(message("jobs", id, id)).await.expect("publish");
        }
        let one = next(&mut sub, "acked").await;
        let two = next(&mut sub, "nacked").await;
        let three = next(&mut sub, "inflight").await;
        assert_eq!(
            [
                one.msg.id.as_str(),
                two.msg.id.as_str(),
                three.msg.id.as_str()
            ],
            ["acked", "nacked", "inflight"]
        );
        one.token.ack().await.expect("ack");
        two.token
            .nack(Duration::from_secs(3600))
            .await
            .expect("nack");
        // three stays unsettled; dropping the broker checkpoints it.
        drop(three);
        drop(sub);
    }
    let b = open(dir.path(), "reopen", &[]).await;
    let mut sub = b.subscribe("jobs", "app").await.expect("subscribe");
    let d = next(&mut sub, "in flight at close").await;
    assert_eq!((d.msg.id.as_str(), d.attempt), ("inflight", 2));
    d.token.ack().await.expect("ack");
    // Neither the acked one nor the nacked one (its hour is not over).
    if let Some(d) = maybe_next(&mut sub, Duration::from_secs(1)).await {
        panic!("{} delivered again after reopen", d.msg.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_cut_off() {
    let dir = TempDir::new("torn");
    {
        let b = open(dir.path(), "torn", &[]).await;
        b.subscribe("t", "app").await.expect("subscribe");
        for i in 0..3 {
            b.publish(message("t", &format!("t-{i}"), "x"))
                .await
                .expect("publish");
        }
    }
    // A record cut short, as a power loss mid-write leaves it.
    let seg_dir = dir.path().join("torn.pubsub");
    let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
        .expect("segments")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    let last = segs.last().expect("a segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(last)
        .expect("open segment");
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9])
        .expect("append garbage");
    drop(f);

    let b = open(dir.path(), "torn", &[]).await;
    let mut sub = b.subscribe("t", "app").await.expect("subscribe");
    b.publish(message("t", "t-3", "x"))
        .await
        .expect("publish after repair");
    let got: Vec<String> = drain(&mut sub, Duration::from_secs(1))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, ["t-0", "t-1", "t-2", "t-3"]);
}

fn segment_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_segments_are_trimmed() {
    let dir = TempDir::new("trim");
    let b = open(dir.path(), "trim", &[("segmentBytes", "4096")]).await;
    let seg_dir = dir.path().join("trim.pubsub");
    let mut fast = b.subscribe("t", "reader").await.expect("subscribe");
    let mut slow = b.subscribe("t", "laggard").await.expect("subscribe");
    for i in 0..120 {
        b.publish(message("t", &format!("m-{i}"), &"y".repeat(300)))
            .await
            .expect("publish");
    }
    let written = segment_count(&seg_dir);
    assert!(
        written >= 8,
        "120 × 300 B in 4 KiB segments: {written} files"
    );
    assert_eq!(
        drain(&mut fast, Duration::from_millis(500)).await.len(),
        120
    );
    // The laggard has acked nothing: every segment stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(segment_count(&seg_dir), written, "kept for the laggard");
    assert_eq!(
        drain(&mut slow, Duration::from_millis(500)).await.len(),
        120
    );
    let start = Instant::now();
    while segment_count(&seg_dir) > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} segments left after every group acked everything",
            segment_count(&seg_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still works after trimming, and across a reopen.
    b.publish(message("t", "after", "z"))
        .await
        .expect("publish");
    assert_eq!(next(&mut fast, "after trim").await.msg.id, "after");
    drop((fast, slow, b));
    let b = open(dir.path(), "trim", &[("segmentBytes", "4096")]).await;
    let mut s = b.subscribe("t", "laggard").await.expect("subscribe");
    assert_eq!(next(&mut s, "after reopen").await.msg.id, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_group_sees_new_messages_only() {
    let dir = TempDir::new("newgroup");
    let b = open(dir.path(), "ng", &[]).await;
    b.publish(message("t", "before", "x"))
        .await
        .expect("publish");
    let mut sub = b.subscribe("t", "late").await.expect("subscribe");
    b.publish(message("t", "after", "x"))
        .await
        .expect("publish");
    let got: Vec<String> = drain(&mut sub, Duration::from_millis(500))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, ["after"]);
}
