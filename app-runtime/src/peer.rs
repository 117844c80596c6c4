//! The container behind a unix-socket peer: SO_PEERCRED gives the peer's
//! pid (set by the kernel at connect, not by the peer), its cgroup path
//! names the container. Works for cgroup v1 and v2 and for the usual
//! runtime layouts (`/kubepods/.../<id>`, `cri-containerd-<id>.scope`,
//! `<namespace>/<id>` under a plain containerd).

use std::os::fd::AsFd;

/// The 64-hex-digit container id in the peer's cgroup, or `None` for a
/// process that is in no container (or whose credentials are unreadable).
pub fn container_of(stream: &tokio::net::UnixStream) -> Option<String> {
    let cred =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .ok()?;
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", cred.pid())).ok()?;
    container_in_cgroup(&text)
}

/// The container id in a `/proc/<pid>/cgroup` text: the last run of
/// exactly 64 hex digits in any line's path.
pub fn container_in_cgroup(text: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for part in path.split(['/', '-', '.', ':']) {
            if part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()) {
                found = Some(part.to_ascii_lowercase());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_container_id_in_common_layouts() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for text in [
            format!("12:memory:/kubepods/besteffort/pod1234/{id}\n11:cpu:/kubepods/besteffort/pod1234/{id}\n"),
            format!("0::/kubepods.slice/kubepods-pod12.slice/cri-containerd-{id}.scope\n"),
            format!("5:pids:/k8s.io/{id}\n"),
        ] {
            assert_eq!(container_in_cgroup(&text).as_deref(), Some(id), "{text}");
        }
        assert_eq!(
            container_in_cgroup("0::/user.slice/session-2.scope\n"),
            None
        );
        assert_eq!(container_in_cgroup("3:cpu:/\n"), None);
    }
}
