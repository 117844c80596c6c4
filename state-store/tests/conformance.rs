//! One suite of Dapr state semantics, run against every backend on a real
//! engine: the embedded file store, a real redis-server and a real
//! PostgreSQL (both started by the test).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeplane_state::{Concurrency, Delete, Error, Item, Op, Save, Store};
use support::{spec, Postgres, Redis, TempDir};

fn save(key: &str, value: &str) -> Save {
    Save {
        key: key.into(),
        value: Bytes::from(value.to_owned()),
        etag: None,
        concurrency: Concurrency::LastWrite,
        ttl: None,
    }
}

fn first_write(key: &str, value: &str, etag: Option<&str>) -> Save {
    Save {
        etag: etag.map(str::to_owned),
        concurrency: Concurrency::FirstWrite,
        ..save(key, value)
    }
}

fn delete(key: &str, etag: Option<&str>, concurrency: Concurrency) -> Delete {
    Delete {
        key: key.into(),
        etag: etag.map(str::to_owned),
        concurrency,
    }
}

async fn must_get(s: &dyn Store, key: &str) -> Item {
    match s.get(key).await {
        Ok(Some(item)) => item,
        other => panic!("get {key}: expected an item, got {other:?}"),
    }
}

async fn value_of(s: &dyn Store, key: &str) -> Option<String> {
    s.get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .map(|i| String::from_utf8(i.value.to_vec()).expect("utf-8 value"))
}

fn is_mismatch(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::EtagMismatch { .. }))
}

async fn round_trip(s: &dyn Store) {
    assert_eq!(value_of(s, "rt").await, None);
    s.save(save("rt", "one")).await.expect("save");
    let item = must_get(s, "rt").await;
    assert_eq!(item.value, Bytes::from_static(b"one"));
    assert!(!item.etag.is_empty());
    // Bytes pass through untouched.
    let raw = Save {
        value: Bytes::from_static(b"\x00\xff{\"a\":1}"),
        ..save("rt-bin", "")
    };
    s.save(raw).await.expect("save binary");
    assert_eq!(
        must_get(s, "rt-bin").await.value,
        Bytes::from_static(b"\x00\xff{\"a\":1}")
    );
    s.delete(delete("rt", None, Concurrency::LastWrite))
        .await
        .expect("delete");
    assert_eq!(value_of(s, "rt").await, None);
    // Deleting an absent key without etag succeeds, in either mode.
    s.delete(delete("rt", None, Concurrency::LastWrite))
        .await
        .expect("delete absent");
    s.delete(delete("rt", None, Concurrency::FirstWrite))
        .await
        .expect("delete absent, first-write");
}

async fn etag_bump(s: &dyn Store) {
    s.save(save("eb", "1")).await.expect("save");
    let e1 = must_get(s, "eb").await.etag;
    s.save(save("eb", "2")).await.expect("save");
    let e2 = must_get(s, "eb").await.etag;
    assert_ne!(e1, e2, "every save bumps the etag");
    let (n1, n2): (u64, u64) = (e1.parse().expect("decimal"), e2.parse().expect("decimal"));
    assert!(n2 > n1, "etags grow: {e1} then {e2}");
    s.save(first_write("eb", "3", Some(&e2)))
        .await
        .expect("first-write with the current etag");
    let e3 = must_get(s, "eb").await.etag;
    assert_ne!(e3, e2);
    let stale = s.save(first_write("eb", "4", Some(&e1))).await;
    assert!(is_mismatch(&stale), "stale etag: {stale:?}");
    assert_eq!(value_of(s, "eb").await.as_deref(), Some("3"));
    // An etag on an absent key cannot match.
    let absent = s.save(first_write("eb-absent", "x", Some(&e3))).await;
    assert!(is_mismatch(&absent), "etag on absent key: {absent:?}");
    assert_eq!(value_of(s, "eb-absent").await, None);
}

async fn first_write_without_etag(s: &dyn Store) {
    s.save(first_write("fw", "a", None))
        .await
        .expect("absent key");
    let again = s.save(first_write("fw", "b", None)).await;
    assert!(is_mismatch(&again), "existing key: {again:?}");
    // An empty etag is no etag (Dapr's HTTP API sends "" for none).
    let empty = s.save(first_write("fw", "c", Some(""))).await;
    assert!(is_mismatch(&empty), "empty etag on existing key: {empty:?}");
    assert_eq!(value_of(s, "fw").await.as_deref(), Some("a"));
}

/// Two writers read the same etag and race: exactly one wins, every time.
async fn first_write_race(s: Arc<dyn Store>) {
    for round in 0..25 {
        let key = format!("race-{round}");
        s.save(save(&key, "start")).await.expect("seed");
        let etag = must_get(&*s, &key).await.etag;
        let writers: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|who| {
                let (s, key, etag) = (s.clone(), key.clone(), etag.clone());
                tokio::spawn(
                    async move { (who, s.save(first_write(&key, who, Some(&etag))).await) },
                )
            })
            .collect();
        let mut won = Vec::new();
        for w in writers {
            let (who, r) = w.await.expect("writer task");
            match r {
                Ok(()) => won.push(who),
                Err(Error::EtagMismatch { .. }) => {}
                Err(e) => panic!("round {round}: {who}: {e}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        assert_eq!(value_of(&*s, &key).await.as_deref(), Some(won[0]));
    }
    // The same for creating an absent key without etag.
    for round in 0..25 {
        let key = format!("race-new-{round}");
        let writers: Vec<_> = ["left", "right"]
            .into_iter()
            .map(|who| {
                let (s, key) = (s.clone(), key.clone());
                tokio::spawn(async move { (who, s.save(first_write(&key, who, None)).await) })
            })
            .collect();
        let mut won = Vec::new();
        for w in writers {
            let (who, r) = w.await.expect("writer task");
            match r {
                Ok(()) => won.push(who),
                Err(Error::EtagMismatch { .. }) => {}
                Err(e) => panic!("round {round}: {who}: {e}"),
            }
        }
        assert_eq!(won.len(), 1, "new key round {round}: winners {won:?}");
        assert_eq!(value_of(&*s, &key).await.as_deref(), Some(won[0]));
    }
}

async fn last_write(s: &dyn Store) {
    s.save(save("lw", "a")).await.expect("save");
    let wrong = Save {
        etag: Some("987654321".into()),
        ..save("lw", "b")
    };
    s.save(wrong)
        .await
        .expect("last-write ignores a wrong etag");
    let junk = Save {
        etag: Some("not-a-number".into()),
        ..save("lw", "c")
    };
    s.save(junk)
        .await
        .expect("last-write ignores an invalid etag");
    assert_eq!(value_of(s, "lw").await.as_deref(), Some("c"));
    s.delete(delete("lw", Some("987654321"), Concurrency::LastWrite))
        .await
        .expect("last-write delete ignores a wrong etag");
    assert_eq!(value_of(s, "lw").await, None);
}

async fn etag_invalid(s: &dyn Store) {
    s.save(save("ei", "a")).await.expect("save");
    for bad in ["abc", "-1", "1.5", " 7"] {
        let r = s.save(first_write("ei", "b", Some(bad))).await;
        assert!(
            matches!(r, Err(Error::EtagInvalid { .. })),
            "save etag {bad:?}: {r:?}"
        );
        let r = s
            .delete(delete("ei", Some(bad), Concurrency::FirstWrite))
            .await;
        assert!(
            matches!(r, Err(Error::EtagInvalid { .. })),
            "delete etag {bad:?}: {r:?}"
        );
    }
    assert_eq!(value_of(s, "ei").await.as_deref(), Some("a"));
}

async fn delete_with_etag(s: &dyn Store) {
    s.save(save("de", "a")).await.expect("save");
    let etag = must_get(s, "de").await.etag;
    let wrong = format!("{}", etag.parse::<u64>().expect("decimal") + 1000);
    let r = s
        .delete(delete("de", Some(&wrong), Concurrency::FirstWrite))
        .await;
    assert!(is_mismatch(&r), "wrong etag: {r:?}");
    assert_eq!(value_of(s, "de").await.as_deref(), Some("a"));
    s.delete(delete("de", Some(&etag), Concurrency::FirstWrite))
        .await
        .expect("right etag");
    assert_eq!(value_of(s, "de").await, None);
    let r = s
        .delete(delete("de", Some(&etag), Concurrency::FirstWrite))
        .await;
    assert!(is_mismatch(&r), "etag on a deleted key: {r:?}");
}

async fn ttl_expires(s: &dyn Store) {
    let ttl = Save {
        ttl: Some(Duration::from_secs(1)),
        ..save("ttl", "short")
    };
    s.save(ttl).await.expect("save with ttl");
    assert_eq!(value_of(s, "ttl").await.as_deref(), Some("short"));
    let start = Instant::now();
    while value_of(s, "ttl").await.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still there after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "gone too early: {:?}",
        start.elapsed()
    );
    let bulk = s.bulk_get(&["ttl".into()]).await.expect("bulk_get");
    assert_eq!(bulk, vec![None], "bulk_get hides expired items too");
    // An expired item is absent for first-write, too.
    s.save(first_write("ttl", "again", None))
        .await
        .expect("first-write over an expired item");
}

async fn ttl_cleared_by_later_save(s: &dyn Store) {
    let ttl = Save {
        ttl: Some(Duration::from_secs(1)),
        ..save("ttl-clear", "short")
    };
    s.save(ttl).await.expect("save with ttl");
    s.save(save("ttl-clear", "kept"))
        .await
        .expect("save without ttl");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(value_of(s, "ttl-clear").await.as_deref(), Some("kept"));
}

async fn bulk_get_in_order(s: &dyn Store) {
    s.save(save("bg-a", "A")).await.expect("save");
    s.save(save("bg-c", "C")).await.expect("save");
    let keys: Vec<String> = ["bg-c", "bg-b", "bg-a", "bg-c"].map(String::from).into();
    let got = s.bulk_get(&keys).await.expect("bulk_get");
    let a = must_get(s, "bg-a").await;
    let c = must_get(s, "bg-c").await;
    assert_eq!(got, vec![Some(c.clone()), None, Some(a), Some(c)]);
    assert_eq!(s.bulk_get(&[]).await.expect("empty bulk_get"), vec![]);
}

async fn transaction_all_or_nothing(s: &dyn Store) {
    s.save(save("tx-x", "x0")).await.expect("save");
    let ex = must_get(s, "tx-x").await.etag;
    let wrong = format!("{}", ex.parse::<u64>().expect("decimal") + 1000);
    let ops = vec![
        Op::Upsert(save("tx-y", "y1")),
        Op::Delete(delete("tx-x", Some(&wrong), Concurrency::FirstWrite)),
        Op::Upsert(save("tx-z", "z1")),
    ];
    let r = s.transact(ops).await;
    assert!(is_mismatch(&r), "bad etag in a transaction: {r:?}");
    assert_eq!(value_of(s, "tx-y").await, None, "earlier op rolled back");
    assert_eq!(value_of(s, "tx-z").await, None, "later op not applied");
    assert_eq!(must_get(s, "tx-x").await.etag, ex, "x untouched");
    // A first-write create of an existing key fails the whole transaction too.
    let ops = vec![
        Op::Upsert(save("tx-y", "y1")),
        Op::Upsert(first_write("tx-x", "x1", None)),
    ];
    assert!(is_mismatch(&s.transact(ops).await));
    assert_eq!(value_of(s, "tx-y").await, None);
    // And so does an invalid etag (checked before anything runs).
    let ops = vec![
        Op::Upsert(save("tx-y", "y1")),
        Op::Upsert(first_write("tx-x", "x1", Some("bogus"))),
    ];
    let r = s.transact(ops).await;
    assert!(matches!(r, Err(Error::EtagInvalid { .. })), "{r:?}");
    assert_eq!(value_of(s, "tx-y").await, None);
    assert_eq!(value_of(s, "tx-x").await.as_deref(), Some("x0"));
}

async fn transaction_applies_all(s: &dyn Store) {
    s.save(save("ta-x", "x0")).await.expect("save");
    s.save(save("ta-d", "d0")).await.expect("save");
    let ex = must_get(s, "ta-x").await.etag;
    let ed = must_get(s, "ta-d").await.etag;
    let ops = vec![
        Op::Upsert(first_write("ta-x", "x1", Some(&ex))),
        Op::Upsert(first_write("ta-new", "n1", None)),
        Op::Delete(delete("ta-d", Some(&ed), Concurrency::FirstWrite)),
        Op::Upsert(Save {
            ttl: Some(Duration::from_secs(60)),
            ..save("ta-ttl", "t1")
        }),
    ];
    s.transact(ops).await.expect("transaction");
    let x = must_get(s, "ta-x").await;
    assert_eq!(x.value, Bytes::from_static(b"x1"));
    assert_ne!(x.etag, ex, "a transaction bumps etags too");
    assert_eq!(value_of(s, "ta-new").await.as_deref(), Some("n1"));
    assert_eq!(value_of(s, "ta-d").await, None);
    assert_eq!(value_of(s, "ta-ttl").await.as_deref(), Some("t1"));
    s.transact(vec![]).await.expect("empty transaction");
}

async fn suite(s: Arc<dyn Store>) {
    s.ping().await.expect("ping");
    round_trip(&*s).await;
    etag_bump(&*s).await;
    first_write_without_etag(&*s).await;
    last_write(&*s).await;
    etag_invalid(&*s).await;
    delete_with_etag(&*s).await;
    bulk_get_in_order(&*s).await;
    transaction_all_or_nothing(&*s).await;
    transaction_applies_all(&*s).await;
    // The slow ones (TTL waits) overlap with the race.
    tokio::join!(
        ttl_expires(&*s),
        ttl_cleared_by_later_save(&*s),
        first_write_race(s.clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded() {
    let dir = TempDir::new("emb");
    let s = nodeplane_state::open(&spec("statestore", "state.embedded", &[]), dir.path())
        .await
        .expect("open embedded");
    suite(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_redis() {
    let redis = Redis::start();
    let dir = TempDir::new("redis-unused");
    let host = redis.host();
    let s = nodeplane_state::open(
        &spec("cache", "state.redis", &[("redisHost", &host)]),
        dir.path(),
    )
    .await
    .expect("open redis");
    suite(s).await;

    // ttlInSeconds: the component's default TTL for saves that carry none;
    // an explicit zero TTL (Dapr's -1) keeps the item anyway.
    let s = nodeplane_state::open(
        &spec(
            "ttlcache",
            "state.redis",
            &[("redisHost", &host), ("ttlInSeconds", "1")],
        ),
        dir.path(),
    )
    .await
    .expect("open redis with ttlInSeconds");
    s.save(save("dflt", "goes")).await.expect("save");
    let kept = Save {
        ttl: Some(Duration::ZERO),
        ..save("dflt-kept", "stays")
    };
    s.save(kept).await.expect("save");
    let start = Instant::now();
    while value_of(&*s, "dflt").await.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "default TTL not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(value_of(&*s, "dflt-kept").await.as_deref(), Some("stays"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_postgresql() {
    let pg = Postgres::start().await;
    let dir = TempDir::new("pg-unused");
    let conn = pg.connection_string();
    let s = nodeplane_state::open(
        &spec(
            "pgstore",
            "state.postgresql",
            &[("connectionString", &conn)],
        ),
        dir.path(),
    )
    .await
    .expect("open postgresql");
    suite(s.clone()).await;
    // A second store on another table of the same database is independent.
    let other = nodeplane_state::open(
        &spec(
            "pgother",
            "state.postgresql",
            &[
                ("connectionString", &conn),
                ("tableName", "public.other_state"),
            ],
        ),
        dir.path(),
    )
    .await
    .expect("open postgresql, tableName");
    assert_eq!(other.get("rt-bin").await.expect("get"), None);
    other.save(save("rt-bin", "other")).await.expect("save");
    assert_eq!(
        must_get(&*s, "rt-bin").await.value,
        Bytes::from_static(b"\x00\xff{\"a\":1}")
    );
}
