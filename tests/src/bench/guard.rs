//! Clean-up that also happens when a benchmark dies (cni-bench,
//! policy-bench and runtime-bench share it).
//!
//! The workspace's release profile sets `panic = "abort"`, so a panic never
//! unwinds and ordinary `Drop` guards would not run. Every namespace,
//! directory and long-lived child this bench creates is therefore also listed
//! in a process-wide registry; a panic hook and a SIGINT/SIGTERM/SIGHUP
//! watcher delete whatever is still listed before the process ends. On the
//! normal path the guards' `Drop` removes the object and its registry entry.

use std::ops::Deref;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Netns, TempDir};

#[derive(Default)]
struct Registry {
    netns: Vec<String>,
    dirs: Vec<std::path::PathBuf>,
    /// Children to kill, with the time after which the watchdog kills them.
    pids: Vec<(u32, Option<Instant>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    dirs: Vec::new(),
    pids: Vec::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    // A poisoned lock only means another thread panicked; the lists are still
    // valid and clean-up must go on.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes everything still registered. Holds the lock until the process
/// ends so no thread can register (and leak) anything afterwards.
fn cleanup_and_hold() -> MutexGuard<'static, Registry> {
    let mut reg = registry();
    for (pid, _) in reg.pids.drain(..) {
        kill(pid);
    }
    for name in reg.netns.drain(..) {
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
    }
    for dir in reg.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
    reg
}

fn kill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The running bench's name (its executable's), for messages.
fn me() -> String {
    std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "bench".into())
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: the handler must stay async-signal-safe.
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Installs the panic hook, the signal handlers and the watchdog thread that
/// kills hung children and reacts to signals. Call once, first thing.
pub fn install() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!(
            "{}: panicked, removing the namespaces and directories it created",
            me()
        );
        // The guard is leaked on purpose: the process aborts right after.
        std::mem::forget(cleanup_and_hold());
    }));
    // A handler (rather than a blocked signal and sigwait) because handlers
    // are reset on exec, while a blocked mask would be inherited by plugins.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: on_signal is async-signal-safe (one atomic store).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(100));
        if SIGNALLED.load(Ordering::SeqCst) {
            eprintln!("{}: interrupted, cleaning up", me());
            let _held = cleanup_and_hold();
            std::process::exit(130);
        }
        let now = Instant::now();
        let mut reg = registry();
        for (pid, deadline) in reg.pids.iter_mut() {
            if deadline.is_some_and(|d| d < now) {
                eprintln!("{}: child {pid} exceeded its time limit, killing it", me());
                kill(*pid);
                *deadline = None;
            }
        }
    });
}

/// A namespace from the harness, also registered for abort-time clean-up.
#[derive(Debug)]
pub struct Ns(Netns);

impl Ns {
    pub fn new(prefix: &str) -> Self {
        let ns = Netns::new(prefix);
        registry().netns.push(ns.name.clone());
        Ns(ns)
    }
}

impl Deref for Ns {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.0
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        registry().netns.retain(|n| *n != self.0.name);
        // The inner Netns deletes the namespace when it drops right after.
    }
}

/// A temporary directory from the harness, also registered for clean-up.
#[derive(Debug)]
pub struct Dir(TempDir);

impl Dir {
    pub fn new(prefix: &str) -> Self {
        let dir = TempDir::new(prefix);
        registry().dirs.push(dir.path().to_path_buf());
        Dir(dir)
    }
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let path = self.0.path();
        registry().dirs.retain(|d| d != path);
    }
}

/// A child process killed (and reaped) on drop, and by the watchdog once
/// `limit` has passed.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn new(child: Child, limit: Duration) -> Self {
        watch(child.id(), limit);
        Proc(child)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        unwatch(self.0.id());
    }
}

/// Registers a child pid so a hang is killed after `limit` and an abort
/// kills it. Cheap (one uncontended lock), so timed invocations use it too.
pub fn watch(pid: u32, limit: Duration) {
    registry().pids.push((pid, Some(Instant::now() + limit)));
}

/// Registers a long-lived child (an agent) that only an abort kills.
pub fn watch_forever(pid: u32) {
    registry().pids.push((pid, None));
}

/// Removes a pid registered with [`watch`], once the child has been reaped.
pub fn unwatch(pid: u32) {
    registry().pids.retain(|(p, _)| *p != pid);
}

/// Registers a namespace and a directory made by the harness elsewhere
/// (e.g. [`crate::fixture::Node`]) for abort-time clean-up; the
/// owner still removes them on the normal path. Unregisters on drop, so
/// declare it after the owner in a struct (fields drop in order).
#[derive(Debug)]
pub struct Reg {
    netns: String,
    dir: std::path::PathBuf,
}

impl Reg {
    pub fn new(netns: &str, dir: &std::path::Path) -> Self {
        let mut reg = registry();
        reg.netns.push(netns.to_string());
        reg.dirs.push(dir.to_path_buf());
        Reg {
            netns: netns.to_string(),
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Reg {
    fn drop(&mut self) {
        let mut reg = registry();
        reg.netns.retain(|n| *n != self.netns);
        reg.dirs.retain(|d| *d != self.dir);
    }
}
