//! Real servers for the conformance suite: each test starts its own on a
//! free 127.0.0.1 port in its own temp dir and kills it on drop (also when
//! the test panics).

#![allow(dead_code)] // each test binary uses a different part

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nodeplane_state::ComponentSpec;

/// A directory removed on drop. Short paths: postgres puts its unix
/// socket here, and socket paths are limited to 107 bytes.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nps-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

pub fn spec(name: &str, kind: &str, metadata: &[(&str, &str)]) -> ComponentSpec {
    ComponentSpec {
        name: name.into(),
        kind: kind.into(),
        version: "v1".into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Tries to start a server up to three times, on a fresh free port each
/// time: another process may take the port between our probe and the
/// server's bind, and the server then exits at once.
const ATTEMPTS: usize = 3;

/// Waits until `ready` holds. `Err` if the server exited (worth another
/// port); panics after 20 s.
fn wait_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited during start-up ({status}):\n{}",
                log_tail(log)
            ));
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} not ready after 20 s:\n{}", log_tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug)]
pub struct Redis {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let bin = Path::new("/usr/bin/redis-server");
        assert!(
            bin.exists(),
            "{} not found: install the Debian package redis-server",
            bin.display()
        );
        let dir = TempDir::new("redis");
        let log = dir.path().join("redis.log");
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut child = Command::new(bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(File::create(&log).expect("redis log"))
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn redis-server");
            match wait_ready(&mut child, "redis-server", &log, || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                Ok(()) => return Redis { child, port, dir },
                Err(e) => failures.push(e),
            }
        }
        panic!("{}", failures.join("\n"));
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Postgres {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn connection_string(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5")
}

/// The newest /usr/lib/postgresql/<major>/bin.
fn pg_bin() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    dirs.sort();
    match dirs.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no /usr/lib/postgresql/<version>/bin/postgres: install the Debian package postgresql"
        ),
    }
}

impl Postgres {
    pub async fn start() -> Postgres {
        let bin = pg_bin();
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        // postgres refuses to run as root: run it as the postgres user the
        // Debian package creates.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let ids = if as_root {
            let (Some(uid), Some(gid)) = (id_of("-u"), id_of("-g")) else {
                panic!("running as root needs the postgres user: install the Debian package postgresql");
            };
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown pg dir");
            Some((uid, gid))
        } else {
            None
        };
        let cmd = |name: &str| {
            let mut c = Command::new(bin.join(name));
            c.env("LC_ALL", "C").env_remove("PGDATA");
            if let Some((uid, gid)) = ids {
                c.uid(uid).gid(gid);
            }
            c
        };
        let log = dir.path().join("pg.log");
        let init = cmd("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("pg log"))
            .stderr(File::options().append(true).open(&log).expect("pg log"))
            .status()
            .expect("run initdb");
        assert!(init.success(), "initdb failed:\n{}", log_tail(&log));
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let mut child = cmd("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                // A throwaway server: durability is not what these tests measure.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::options().append(true).open(&log).expect("pg log"))
                .spawn()
                .expect("spawn postgres");
            // Accepting TCP is not ready ("the database system is starting up"): log in.
            let conn = connection_string(port);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    failures.push(format!(
                        "postgres exited during start-up ({status}):\n{}",
                        log_tail(&log)
                    ));
                    break;
                }
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
                {
                    drop(client);
                    let _ = connection.await;
                    return Postgres { child, port, dir };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("postgres not ready after 20 s:\n{}", log_tail(&log));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("{}", failures.join("\n"));
    }

    pub fn connection_string(&self) -> String {
        connection_string(self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the postmaster takes its backends down too.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
