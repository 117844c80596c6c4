//! np-app: a small app for the app runtime's tests, benchmark and demo.
//!
//! `np-app serve PORT [--exit-on-stdin-eof]` answers HTTP/1.1 (prints
//! `ready` once listening):
//! - `/status/CODE`: that status, body `status CODE`;
//! - `/slow/MS`: 200 after MS milliseconds;
//! - `/count`: reads key `count` from the node runtime's state store
//!   (`statestore`), adds one and saves it with first-write concurrency
//!   (retrying on conflict), answers the new value;
//! - `GET /dapr/subscribe`, when `NP_APP_SUBSCRIBE` is set: its value
//!   (Dapr's subscription list, JSON);
//! - `POST /sub/...`: a pub/sub delivery, recorded for `/deliveries`. The
//!   message (a CloudEvent's `data`, or the raw body) is JSON with `key`
//!   and optionally `answer`, a list: the n-th delivery of that key to
//!   that path is answered by `answer[n-1]` (the last one repeats):
//!   `SUCCESS`, `RETRY`, `DROP` (as `{"status": ...}`), a status code
//!   (`404`, `500`), `empty` (200, no body) or `slow:MS` (SUCCESS after MS
//!   milliseconds). No answer list: SUCCESS. Paths under `/sub/ok/` always
//!   answer SUCCESS (for dead-letter subscribers);
//! - `POST /configuration/...`: a configuration change pushed by the
//!   runtime, recorded like a delivery (answered 200);
//! - `POST /cron/...`: an input binding's firing, recorded for
//!   `/deliveries` like a pub/sub delivery (key `""`, plus the `timeZone`
//!   and `readTimeUTC` headers); answered 200, except that paths under
//!   `/cron/fail-first/` answer 500 to their first firing. `OPTIONS
//!   /cron/...` answers 200 (the runtime's "does the app listen" probe);
//! - `GET /deliveries`: every delivery so far, as a JSON list of `{path,
//!   key, n, contentType, body}` (`n`: the how-manieth delivery of the key
//!   to the path);
//! - anything else: echoes the body, with `x-echo-method`, `x-echo-uri`,
//!   `x-echo-caller` (the `dapr-caller-app-id` the runtime set),
//!   `x-echo-traceparent` and `x-echo-h-NAME` for every `x-` header.
//!
//! `np-app call METHOD URL [BODY]` sends one request to the runtime
//! (`http://HOST:PORT/...`, or `unix:SOCKET:/path`) and prints the status,
//! then the body. The runtime's address is `DAPR_HTTP_ENDPOINT` /
//! `NODEPLANE_RUNTIME_SOCKET` when set, else 169.254.1.1:3500.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use nodeplane_tests::http1::{read_msg, write_response, Conn, Msg};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("call") => call(&args[1..]),
        _ => {
            eprintln!(
                "usage: np-app serve PORT [--exit-on-stdin-eof] | np-app call METHOD URL [BODY]"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(args: &[String]) -> ExitCode {
    let Some(port) = args.first().and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("np-app serve: PORT missing or not a number");
        return ExitCode::from(2);
    };
    let l = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("np-app: bind {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.iter().any(|a| a == "--exit-on-stdin-eof") {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            std::process::exit(0);
        });
    }
    println!("ready");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || conn(s));
    }
    ExitCode::SUCCESS
}

fn conn(s: TcpStream) {
    let _ = s.set_nodelay(true);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    while let Ok(Some(req)) = read_msg(&mut r, false) {
        let (status, headers, body) = answer(&req);
        if write_response(&mut w, status, &headers, &body).is_err() {
            return;
        }
    }
}

fn answer(req: &Msg) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut parts = req.start.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let uri = parts.next().unwrap_or("").to_string();
    let path = uri.split('?').next().unwrap_or("");
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        return (code, vec![], format!("status {code}").into_bytes());
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|c| c.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
        return (200, vec![], b"slow".to_vec());
    }
    if path == "/dapr/subscribe" {
        if let Ok(subs) = std::env::var("NP_APP_SUBSCRIBE") {
            return (
                200,
                vec![("content-type".into(), "application/json".into())],
                subs.into_bytes(),
            );
        }
    }
    if method == "POST" && (path.starts_with("/sub/") || path.starts_with("/configuration/")) {
        return delivery(req, path);
    }
    if path.starts_with("/cron/") {
        match method.as_str() {
            "OPTIONS" => return (200, vec![], Vec::new()),
            "POST" => return firing(req, path),
            _ => {}
        }
    }
    if path == "/deliveries" {
        let list = DELIVERIES.lock().unwrap_or_else(|e| e.into_inner());
        let body = serde_json::to_vec(&*list).unwrap_or_default();
        return (
            200,
            vec![("content-type".into(), "application/json".into())],
            body,
        );
    }
    if path == "/count" {
        return match count() {
            Ok(n) => (200, vec![], n.to_string().into_bytes()),
            Err(e) => (500, vec![], e.into_bytes()),
        };
    }
    let mut h = vec![
        ("x-echo-method".to_string(), method),
        ("x-echo-uri".to_string(), uri),
        (
            "x-echo-caller".to_string(),
            req.header("dapr-caller-app-id").unwrap_or("-").to_string(),
        ),
        (
            "x-echo-traceparent".to_string(),
            req.header("traceparent").unwrap_or("-").to_string(),
        ),
    ];
    for (k, v) in &req.headers {
        if k.to_ascii_lowercase().starts_with("x-") {
            h.push((format!("x-echo-h-{}", k.to_ascii_lowercase()), v.clone()));
        }
    }
    (200, h, req.body.clone())
}

static DELIVERIES: Mutex<Vec<serde_json::Value>> = Mutex::new(Vec::new());
static SEEN: Mutex<Option<HashMap<(String, String), usize>>> = Mutex::new(None);

/// Records a call for `/deliveries` (with `extra`'s fields) and returns
/// how many times `key` has come to `path` so far.
fn record(req: &Msg, path: &str, key: &str, extra: serde_json::Value) -> usize {
    let n = {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        let c = seen
            .get_or_insert_with(HashMap::new)
            .entry((path.to_string(), key.to_string()))
            .or_insert(0);
        *c += 1;
        *c
    };
    let mut entry = serde_json::json!({
        "path": path,
        "key": key,
        "n": n,
        "contentType": req.header("content-type").unwrap_or(""),
        "body": String::from_utf8_lossy(&req.body),
    });
    if let (Some(e), serde_json::Value::Object(more)) = (entry.as_object_mut(), extra) {
        e.extend(more);
    }
    DELIVERIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(entry);
    n
}

/// Records one pub/sub delivery and answers as its message asks.
fn delivery(req: &Msg, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use serde_json::Value;
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let msg = match body.get("data") {
        Some(d) if body.get("specversion").is_some() => d.clone(),
        _ => body.clone(),
    };
    let key = msg
        .get("key")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let n = record(req, path, &key, serde_json::json!({}));
    let answers: Vec<String> = msg
        .get("answer")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let answer = if path.starts_with("/sub/ok/") {
        "SUCCESS"
    } else {
        answers
            .get(n - 1)
            .or(answers.last())
            .map_or("SUCCESS", String::as_str)
    };
    let status = |s: &str| (200, vec![], format!(r#"{{"status":"{s}"}}"#).into_bytes());
    if let Some(ms) = answer.strip_prefix("slow:").and_then(|m| m.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
        return status("SUCCESS");
    }
    if let Ok(code) = answer.parse::<u16>() {
        return (code, vec![], format!("status {code}").into_bytes());
    }
    match answer {
        "empty" => (200, vec![], Vec::new()),
        other => status(other),
    }
}

/// Records one input binding firing (see the module docs).
fn firing(req: &Msg, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let n = record(
        req,
        path,
        "",
        serde_json::json!({
            "timeZone": req.header("timezone").unwrap_or(""),
            "readTimeUTC": req.header("readtimeutc").unwrap_or(""),
        }),
    );
    if path.starts_with("/cron/fail-first/") && n == 1 {
        return (500, vec![], b"failing the first firing".to_vec());
    }
    (200, vec![], Vec::new())
}

/// Where the runtime is, as a Dapr SDK would find it.
fn runtime() -> String {
    if let Ok(e) = std::env::var("DAPR_HTTP_ENDPOINT") {
        return e;
    }
    if let Ok(p) = std::env::var("DAPR_HTTP_PORT") {
        return format!("http://127.0.0.1:{p}");
    }
    "http://169.254.1.1:3500".into()
}

/// Sends one request to `url` (`http://host:port/path` or
/// `unix:/socket:/path`).
fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Msg, String> {
    if let Some(rest) = url.strip_prefix("unix:") {
        let (sock, path) = rest.split_once(":/").ok_or("unix:SOCKET:/path")?;
        let s = UnixStream::connect(sock).map_err(|e| format!("connect {sock}: {e}"))?;
        return Conn::new(s)
            .request(method, &format!("/{path}"), headers, body)
            .map_err(|e| e.to_string());
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or("URL must start with http:// or unix:")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let s = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
    Conn::new(s)
        .request(method, &format!("/{path}"), headers, body)
        .map_err(|e| e.to_string())
}

fn count() -> Result<u64, String> {
    let base = runtime();
    for _ in 0..50 {
        let got = request(
            "GET",
            &format!("{base}/v1.0/state/statestore/count"),
            &[],
            b"",
        )?;
        let (n, etag) = match got.status() {
            200 => (
                got.text()
                    .trim()
                    .parse::<u64>()
                    .map_err(|e| format!("count {:?}: {e}", got.text()))?,
                got.header("etag").map(str::to_string),
            ),
            204 => (0, None),
            s => return Err(format!("get count: {s} {}", got.text())),
        };
        let mut item = serde_json::json!({"key": "count", "value": n + 1, "options": {"concurrency": "first-write"}});
        if let Some(e) = etag {
            item["etag"] = e.into();
        }
        let body = serde_json::to_vec(&[item]).map_err(|e| e.to_string())?;
        let saved = request(
            "POST",
            &format!("{base}/v1.0/state/statestore"),
            &[("content-type", "application/json")],
            &body,
        )?;
        match saved.status() {
            204 => return Ok(n + 1),
            409 => continue,
            s => return Err(format!("save count: {s} {}", saved.text())),
        }
    }
    Err("count: 50 conflicts in a row".into())
}

fn call(args: &[String]) -> ExitCode {
    let (Some(method), Some(url)) = (args.first(), args.get(1)) else {
        eprintln!("usage: np-app call METHOD URL [BODY]");
        return ExitCode::from(2);
    };
    let url = if url.starts_with('/') {
        format!("{}{url}", runtime())
    } else {
        url.clone()
    };
    let body = args
        .get(2)
        .map(|b| b.as_bytes().to_vec())
        .unwrap_or_default();
    match request(method, &url, &[("content-type", "application/json")], &body) {
        Ok(m) => {
            match m.header("x-echo-caller") {
                Some(c) => println!("{} {} (caller {c})", m.status(), m.text()),
                None => println!("{} {}", m.status(), m.text()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("np-app call: {e}");
            ExitCode::FAILURE
        }
    }
}
