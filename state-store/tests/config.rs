//! Unusable component specs fail at open with a message naming the
//! component, the field and the fix.

mod support;

use nodeplane_state::Error;
use support::{spec, TempDir};

async fn config_error(kind: &str, metadata: &[(&str, &str)]) -> String {
    config_error_named("mystore", kind, metadata).await
}

async fn config_error_named(name: &str, kind: &str, metadata: &[(&str, &str)]) -> String {
    let dir = TempDir::new("cfg");
    match nodeplane_state::open(&spec(name, kind, metadata), dir.path()).await {
        Err(Error::Config(msg)) => msg,
        Err(e) => panic!("{kind}: expected a config error, got {e}"),
        Ok(s) => panic!("{kind}: expected a config error, opened {s:?}"),
    }
}

#[tokio::test]
async fn unknown_kind() {
    let msg = config_error("state.cassandra", &[]).await;
    assert!(
        msg.contains("mystore") && msg.contains("state.cassandra"),
        "{msg}"
    );
    assert!(
        msg.contains("state.embedded, state.redis, state.postgresql"),
        "{msg}"
    );
}

#[tokio::test]
async fn redis_needs_host() {
    let msg = config_error("state.redis", &[]).await;
    assert!(
        msg.contains("mystore") && msg.contains("redisHost") && msg.contains("host:port"),
        "{msg}"
    );
    let msg = config_error("state.redis", &[("redisHost", "localhost:port")]).await;
    assert!(msg.contains("port"), "{msg}");
    let msg = config_error(
        "state.redis",
        &[("redisHost", "localhost:6379"), ("redisDB", "x")],
    )
    .await;
    assert!(msg.contains("redisDB"), "{msg}");
}

#[tokio::test]
async fn postgres_needs_connection_string() {
    let msg = config_error("state.postgresql", &[]).await;
    assert!(
        msg.contains("mystore") && msg.contains("connectionString"),
        "{msg}"
    );
    let msg = config_error(
        "state.postgresql",
        &[
            ("connectionString", "host=x"),
            ("tableName", "state; DROP TABLE x"),
        ],
    )
    .await;
    assert!(msg.contains("tableName"), "{msg}");
    let msg = config_error(
        "state.postgresql",
        &[("connectionString", "host=x password=hunter2 bogus_option=1")],
    )
    .await;
    assert!(
        msg.contains("connectionString") && !msg.contains("hunter2"),
        "{msg}"
    );
}

#[tokio::test]
async fn embedded_needs_a_file_name() {
    for name in ["", "..", "a/b"] {
        let msg = config_error_named(name, "state.embedded", &[]).await;
        assert!(msg.contains("metadata.name"), "{msg}");
    }
}
