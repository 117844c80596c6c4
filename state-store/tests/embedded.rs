//! The embedded store keeps what it acknowledged: across a clean reopen and
//! across kill -9 of the writing process.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeplane_state::{Concurrency, Op, Save};
use support::{spec, TempDir};

/// Set (to a state dir) only in the child that `kill9_keeps_acknowledged` starts.
const WRITER_ENV: &str = "NODEPLANE_STATE_TEST_WRITER_DIR";

fn save(key: &str, value: &str) -> Save {
    Save {
        key: key.into(),
        value: Bytes::from(value.to_owned()),
        etag: None,
        concurrency: Concurrency::LastWrite,
        ttl: None,
    }
}

#[tokio::test]
async fn reopen_keeps_data() {
    let dir = TempDir::new("reopen");
    let component = spec("reopen", "state.embedded", &[]);
    let s = nodeplane_state::open(&component, dir.path())
        .await
        .expect("open");
    s.save(save("a", "1")).await.expect("save");
    s.transact(vec![Op::Upsert(save("b", "2")), Op::Upsert(save("c", "3"))])
        .await
        .expect("transact");
    let etag = s.get("a").await.expect("get").expect("a").etag;
    // A second open of the same file while the first is live is refused.
    let twice = nodeplane_state::open(&component, dir.path()).await;
    assert!(twice.is_err(), "the file is locked while open");
    drop(s);

    let s = nodeplane_state::open(&component, dir.path())
        .await
        .expect("reopen");
    let got = s
        .bulk_get(&["a".into(), "b".into(), "c".into()])
        .await
        .expect("bulk_get");
    let values: Vec<_> = got
        .iter()
        .map(|i| i.as_ref().map(|i| i.value.clone()))
        .collect();
    assert_eq!(
        values,
        vec![Some("1".into()), Some("2".into()), Some("3".into())]
    );
    assert_eq!(
        got[0].as_ref().map(|i| &i.etag),
        Some(&etag),
        "etags survive"
    );
    // Etags keep growing after a reopen: no etag is issued twice.
    s.save(save("a", "again")).await.expect("save");
    let after = s.get("a").await.expect("get").expect("a").etag;
    assert!(after.parse::<u64>().expect("decimal") > etag.parse::<u64>().expect("decimal"));
    assert!(dir.path().join("reopen.redb").exists());
}

/// The writer half of `kill9_keeps_acknowledged`: a no-op unless started by it.
#[tokio::test]
async fn durability_writer_child() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let s = nodeplane_state::open(&spec("durable", "state.embedded", &[]), dir.as_ref())
        .await
        .expect("open");
    let mut out = std::io::stdout().lock();
    for i in 0..100_000u32 {
        if i % 3 == 2 {
            // Every third acknowledgement is a two-key transaction.
            let ops = vec![
                Op::Upsert(save(&format!("k{i}"), &format!("v{i}"))),
                Op::Upsert(save(&format!("t{i}"), &format!("v{i}"))),
            ];
            s.transact(ops).await.expect("transact");
            writeln!(out, "ack k{i} t{i}").expect("stdout");
        } else {
            s.save(save(&format!("k{i}"), &format!("v{i}")))
                .await
                .expect("save");
            writeln!(out, "ack k{i}").expect("stdout");
        }
        out.flush().expect("flush");
    }
}

#[tokio::test]
async fn kill9_keeps_acknowledged() {
    let dir = TempDir::new("kill9");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([
            "durability_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_ENV, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked: Vec<String> = Vec::new();
    let start = Instant::now();
    // Kill it mid-stream, after a few hundred acknowledged writes.
    while acked.len() < 300 && start.elapsed() < Duration::from_secs(20) {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(keys) = line.strip_prefix("ack ") {
                    acked.extend(keys.split(' ').map(str::to_owned));
                }
            }
            _ => break,
        }
    }
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("wait writer");
    assert!(
        !status.success(),
        "the writer was killed, not finished: {status}"
    );
    // Acknowledgements already in the pipe were acknowledged before the kill.
    for line in lines.map_while(Result::ok) {
        if let Some(keys) = line.strip_prefix("ack ") {
            acked.extend(keys.split(' ').map(str::to_owned));
        }
    }
    assert!(
        acked.len() >= 100,
        "only {} writes acknowledged before the kill",
        acked.len()
    );

    let s = nodeplane_state::open(&spec("durable", "state.embedded", &[]), dir.path())
        .await
        .expect("reopen after kill -9");
    let got = s.bulk_get(&acked).await.expect("bulk_get");
    let lost: Vec<&String> = acked
        .iter()
        .zip(&got)
        .filter(|(k, item)| {
            let want = format!("v{}", &k[1..]);
            item.as_ref().map(|i| i.value.as_ref()) != Some(want.as_bytes())
        })
        .map(|(k, _)| k)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged keys lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    eprintln!("kill -9 after {} acknowledged keys: none lost", acked.len());
}
