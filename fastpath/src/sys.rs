//! The bpf(2) calls the fast path makes, on raw attribute buffers.
//!
//! `union bpf_attr` differs per command; each wrapper fills only the fields
//! its command reads, at the offsets linux/bpf.h gives, and leaves the rest
//! zero (the kernel rejects non-zero bytes it does not know).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const MAP_CREATE: u32 = 0;
const MAP_LOOKUP_ELEM: u32 = 1;
const MAP_UPDATE_ELEM: u32 = 2;
const MAP_DELETE_ELEM: u32 = 3;
const MAP_GET_NEXT_KEY: u32 = 4;
const PROG_LOAD: u32 = 5;
const PROG_GET_FD_BY_ID: u32 = 13;
const MAP_GET_FD_BY_ID: u32 = 14;
const OBJ_GET_INFO_BY_FD: u32 = 15;

pub const MAP_TYPE_HASH: u32 = 1;
pub const MAP_TYPE_LRU_HASH: u32 = 9;
pub const PROG_TYPE_SCHED_CLS: u32 = 3;

/// An attribute buffer, larger than any layout used here.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(&mut self, off: usize, name: &str) -> &mut Attr {
        let b = name.as_bytes();
        let n = b.len().min(15);
        self.0[off..off + n].copy_from_slice(&b[..n]);
        self
    }
    fn call(&mut self, cmd: u32) -> io::Result<i64> {
        // SAFETY: the buffer outlives the call, and every pointer stored in it
        // points at memory the caller keeps alive for the call's duration.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_long,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    fn call_fd(&mut self, cmd: u32) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)? as RawFd;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

pub fn map_create(
    kind: u32,
    key: u32,
    value: u32,
    entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, entries)
        .name(28, name)
        .call_fd(MAP_CREATE)
}

pub fn map_lookup(map: RawFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let r = Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64)
        .call(MAP_LOOKUP_ELEM);
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn map_update(map: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_ptr() as u64)
        .call(MAP_UPDATE_ELEM)
        .map(drop)
}

/// Deletes `key`; an absent key is not an error.
pub fn map_delete(map: RawFd, key: &[u8]) -> io::Result<()> {
    match Attr::new()
        .u32(0, map as u32)
        .u64(8, key.as_ptr() as u64)
        .call(MAP_DELETE_ELEM)
    {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// The key after `key` (the first key when `key` is `None`); `false` at the end.
pub fn map_next_key(map: RawFd, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let r = Attr::new()
        .u32(0, map as u32)
        .u64(8, key.map_or(0, |k| k.as_ptr() as u64))
        .u64(16, next.as_mut_ptr() as u64)
        .call(MAP_GET_NEXT_KEY);
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Loads a SCHED_CLS program; on a verifier rejection the error carries the
/// verifier's log.
pub fn prog_load(insns: &[u64], name: &str) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let first = Attr::new()
        .u32(0, PROG_TYPE_SCHED_CLS)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .name(48, name)
        .call_fd(PROG_LOAD);
    let Err(e) = first else { return first };
    // Load again with the verifier's log on, to say why.
    let mut log = vec![0u8; 64 * 1024];
    let _ = Attr::new()
        .u32(0, PROG_TYPE_SCHED_CLS)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .name(48, name)
        .call_fd(PROG_LOAD);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let tail: String = text.lines().rev().take(12).collect::<Vec<_>>().join(" | ");
    Err(io::Error::new(e.kind(), format!("{e}; verifier: {tail}")))
}

pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    Attr::new().u32(0, id).call_fd(PROG_GET_FD_BY_ID)
}

pub fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    Attr::new().u32(0, id).call_fd(MAP_GET_FD_BY_ID)
}

/// What the fast path checks of a loaded program: its id, name and maps.
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub map_ids: Vec<u32>,
}

/// What the fast path checks of a map: its id, name and shape.
pub struct MapInfo {
    pub name: String,
    pub key_size: u32,
    pub value_size: u32,
}

fn info(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    Attr::new()
        .u32(0, fd as u32)
        .u32(4, buf.len() as u32)
        .u64(8, buf.as_mut_ptr() as u64)
        .call(OBJ_GET_INFO_BY_FD)
        .map(drop)
}

fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn read_name(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// `struct bpf_prog_info`: id at 4, nr_map_ids at 52, map_ids at 56, name at 64.
pub fn prog_info(fd: RawFd) -> io::Result<ProgInfo> {
    let mut ids = [0u32; 8];
    let mut b = [0u8; 80];
    b[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    b[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    info(fd, &mut b)?;
    let n = (read_u32(&b, 52) as usize).min(ids.len());
    Ok(ProgInfo {
        id: read_u32(&b, 4),
        name: read_name(&b[64..80]),
        map_ids: ids[..n].to_vec(),
    })
}

/// `struct bpf_map_info`: key_size at 8, value_size at 12, name at 24.
pub fn map_info(fd: RawFd) -> io::Result<MapInfo> {
    let mut b = [0u8; 40];
    info(fd, &mut b)?;
    Ok(MapInfo {
        name: read_name(&b[24..40]),
        key_size: read_u32(&b, 8),
        value_size: read_u32(&b, 12),
    })
}
