//! Thin wrappers over the kernel and the standard tools the backends use:
//! commands, mounts (read back from /proc/self/mountinfo), loop devices
//! (read back from /sys/block), files (atomic writes, reflink copies).

pub mod cmd;
pub mod files;
pub mod loopdev;
pub mod mount;
