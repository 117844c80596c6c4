//! A short scheduler slice for the shim's threads (`--sched-slice-us`,
//! off by default).
//!
//! Every call crosses the shim twice, and each crossing begins with a
//! wake-up. Under Linux's EEVDF scheduler a woken thread can wait for the
//! task running on its CPU to use up its slice (1.4 ms on the project's
//! 2-vCPU VM) first. There, ListContainers calls slow down in bursts about
//! every 20 ms, most likely containerd's garbage collector keeping both
//! vCPUs busy. Those calls are where the shim's p99 added came from.
//!
//! Since Linux 6.12 a SCHED_OTHER thread can ask for a shorter slice
//! (`sched_attr.sched_runtime`). It then preempts sooner when woken, and gets
//! no larger share of the CPU. Measured, that shortened ListContainers' p99
//! added and cost throughput when the CPUs were saturated (more context
//! switches), so it is the operator's choice. By the kernel source, older
//! kernels ignore the field (not tried on one).

/// Asks for a `us`-microsecond slice for the calling thread; 0 leaves the
/// kernel's default. A thread under another policy (an operator's
/// SCHED_FIFO, say) is left as it is.
pub fn short_slice(us: u64) -> std::io::Result<()> {
    // SAFETY: sched_getscheduler only reads the calling thread's policy.
    if us == 0 || unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return Ok(());
    }
    // sched_setattr sets the nice value too: keep the thread's own. (-1 is
    // both a nice value and getpriority's error return; either way it is
    // a valid nice value to pass.)
    // SAFETY: getpriority only reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: us * 1_000,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a whole sched_attr whose size field says so; pid 0
    // is the calling thread; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
