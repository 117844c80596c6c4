//! CPU time from /proc, as the benchmarks report it next to their timings.

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of the counts below.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Busy ticks of all CPUs so far (/proc/stat's first line: user, nice,
/// system, irq and softirq; idle, iowait and steal are not work done here).
pub fn busy_ticks() -> Result<u64, String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    Ok([0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum())
}

/// User and system ticks of process `pid`, all its threads.
pub fn process_ticks(pid: u32) -> Result<(u64, u64), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e} (did the process exit?)"))?;
    // Fields after the command name (which may hold spaces): the first is
    // field 3 (state), so utime (14) and stime (15) are at indexes 11 and 12.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((ticks(11), ticks(12)))
}
