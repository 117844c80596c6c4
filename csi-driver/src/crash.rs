//! Crash injection for the crash tests: a named point between every two
//! consecutive steps of every mutating operation, for both backends.
//!
//! When `NODEPLANE_CSI_CRASH_AT` names a point, the process SIGKILLs itself
//! there, as a kill -9 between those two steps would. When
//! `NODEPLANE_CSI_PAUSE_AT` names it, the operation waits there (its volume
//! lock held) until the file `NODEPLANE_CSI_PAUSE_RELEASE` exists, so a test
//! can make a concurrent call meet a busy volume deterministically. Both are
//! unset in production, where a point costs one environment lookup.
//!
//! Names are `<operation>:<step>` (both backends) or
//! `<operation>:<backend>:<step>` (one backend). [`POINTS`] lists them all;
//! a unit test checks it against the call sites, and the integration test
//! `tests/tests/csi_crash.rs` crashes at each one, so a new point cannot be
//! left untested.

/// Every crash point, by operation, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    // CreateVolume: intent record → storage → ready record.
    "create:after-intent",
    // image: sparse file → mkfs → final size + directory fsync.
    "create:image:after-file",
    "create:image:after-mkfs",
    // btrfs: subvolume → qgroup limit.
    "create:btrfs:after-subvolume",
    "create:after-storage",
    // CreateVolume from a snapshot: copy (reflink) → grow to size.
    "restore:image:after-copy",
    // btrfs: snapshot of the snapshot → qgroup limit.
    "restore:btrfs:after-snapshot",
    // CreateVolume from a volume: freeze the staged source → copy → thaw.
    "clone:image:after-freeze",
    "clone:image:after-copy",
    "clone:btrfs:after-snapshot",
    // DeleteVolume: deleting record → storage removed → record removed.
    "delete:after-intent",
    // btrfs: subvolume delete → wait for the cleaner → qgroup destroy.
    "delete:btrfs:after-subvolume-delete",
    "delete:after-storage",
    // ControllerExpandVolume: intent (expanding_to) → storage → record.
    "expand:after-intent",
    // image: truncate → losetup --set-capacity (when attached).
    "expand:image:after-truncate",
    "expand:after-storage",
    // NodeExpandVolume: losetup --set-capacity → grow the filesystem → record.
    "node-expand:image:after-refresh",
    "node-expand:image:after-grow",
    // CreateSnapshot: intent record → copy → ready record.
    "snapshot:after-intent",
    // image, staged volume: freeze → reflink copy → thaw.
    "snapshot:image:after-freeze",
    "snapshot:image:after-copy",
    "snapshot:after-storage",
    // DeleteSnapshot: deleting record → storage removed → record removed.
    "delete-snapshot:after-intent",
    "delete-snapshot:btrfs:after-subvolume-delete",
    "delete-snapshot:after-storage",
    // NodeStageVolume: losetup → (mkfs once) mount → record.
    "stage:image:after-attach",
    "stage:after-mount",
    // NodeUnstageVolume: umount → losetup --detach → record.
    "unstage:after-unmount",
    "unstage:image:after-detach",
    // NodePublishVolume: bind mount → record.
    "publish:after-mount",
    // NodeUnpublishVolume: umount + remove target → record.
    "unpublish:after-unmount",
    // Ephemeral inline volume: create → stage → record → bind mount; at
    // unpublish: unstage → delete.
    "ephemeral:after-create",
    "ephemeral:after-stage",
    "ephemeral:after-unstage",
];

/// A crash (or pause) point named `step`, which must be in [`POINTS`].
pub(crate) fn point(step: &str) {
    debug_assert!(
        POINTS.contains(&step),
        "crash point {step} is not in POINTS"
    );
    if std::env::var("NODEPLANE_CSI_PAUSE_AT").is_ok_and(|s| s == step) {
        if let Some(release) = std::env::var_os("NODEPLANE_CSI_PAUSE_RELEASE") {
            tracing::warn!(step, "pause point reached");
            while !std::path::Path::new(&release).exists() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
    if std::env::var("NODEPLANE_CSI_CRASH_AT").is_ok_and(|s| s == step) {
        tracing::warn!(step, "crash point reached: SIGKILL");
        // SAFETY: kill on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::POINTS;
    use std::collections::BTreeSet;

    /// The call sites, from the sources: every `crash::point("...")`.
    fn called() -> BTreeSet<String> {
        let sources = [
            include_str!("driver/controller.rs"),
            include_str!("driver/node.rs"),
            include_str!("backend/image.rs"),
            include_str!("backend/btrfs.rs"),
        ];
        let mut out = BTreeSet::new();
        for src in sources {
            for part in src.split("crash::point(\"").skip(1) {
                if let Some((name, _)) = part.split_once('"') {
                    out.insert(name.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn every_listed_point_has_a_call_site_and_every_call_site_is_listed() {
        let listed: BTreeSet<String> = POINTS.iter().map(|s| s.to_string()).collect();
        assert_eq!(listed.len(), POINTS.len(), "a point is listed twice");
        let called = called();
        let unlisted: Vec<_> = called.difference(&listed).collect();
        let uncalled: Vec<_> = listed.difference(&called).collect();
        assert!(
            unlisted.is_empty(),
            "call sites missing from POINTS: {unlisted:?}"
        );
        assert!(
            uncalled.is_empty(),
            "POINTS with no call site: {uncalled:?}"
        );
    }

    #[test]
    fn names_say_operation_and_backend() {
        for p in POINTS {
            let parts: Vec<&str> = p.split(':').collect();
            match parts.as_slice() {
                [_, step] => assert!(step.starts_with("after-"), "{p}"),
                [_, backend, step] => {
                    assert!(matches!(*backend, "image" | "btrfs"), "{p}");
                    assert!(step.starts_with("after-"), "{p}");
                }
                _ => panic!("crash point {p}: write <op>:<step> or <op>:<backend>:<step>"),
            }
        }
    }
}
