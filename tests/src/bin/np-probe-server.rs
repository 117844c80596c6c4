//! np-probe-server: the listener behind NetworkPolicy truth-table probes.
//!
//! Usage: `np-probe-server [--id NAME] [--exit-on-stdin-eof] PORT...`
//!
//! For each PORT it listens on TCP and UDP (0.0.0.0). Every TCP connection
//! gets one line, `NAME PORT/tcp\n`, and is closed; every UDP datagram is
//! echoed back unchanged to its sender. Once all sockets are bound it prints
//! `ready` on stdout, so whoever started it knows it is listening.
//! `--exit-on-stdin-eof` makes it exit when its stdin closes, so a server
//! whose parent dies (even by SIGKILL) does not linger.
//!
//! Run it inside a pod's network namespace. std only, no dependencies.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::exit;
use std::thread;

fn main() {
    let mut id = String::from("np-probe-server");
    let mut ports = Vec::new();
    let mut exit_on_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--id" => id = args.next().unwrap_or_else(|| usage("--id needs a value")),
            "--exit-on-stdin-eof" => exit_on_eof = true,
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => usage(&format!("bad port {p:?}")),
            },
        }
    }
    if ports.is_empty() {
        usage("no ports given");
    }

    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for &port in &ports {
        let t = TcpListener::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("bind tcp :{port}: {e}")));
        let u = UdpSocket::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("bind udp :{port}: {e}")));
        tcp.push((port, t));
        udp.push(u);
    }

    for (port, listener) in tcp {
        let line = format!("{id} {port}/tcp\n");
        thread::spawn(move || {
            // An accept error (e.g. the peer already gave up) skips that
            // connection; a write error is the peer's problem, not ours.
            for mut s in listener.incoming().flatten() {
                let _ = s.write_all(line.as_bytes());
            }
        });
    }
    for sock in udp {
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
    }

    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();

    if exit_on_eof {
        // Blocks until the parent closes our stdin (or dies).
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        exit(0);
    }
    loop {
        thread::park();
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "np-probe-server: {msg}\nusage: np-probe-server [--id NAME] [--exit-on-stdin-eof] PORT..."
    );
    exit(2);
}

fn fail(msg: &str) -> ! {
    eprintln!("np-probe-server: {msg}");
    exit(1);
}
