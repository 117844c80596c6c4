//! Turns overlapping allow entries (address range × protocol range × port
//! range, each tagged with the policy that allowed it) into disjoint cells.
//!
//! Why: a rule group is one nftables map keyed by the concatenation
//! `address . protocol . port` with interval flags, so one lookup decides a
//! packet however many rules there are. The kernel's pipapo set refuses
//! overlapping elements, and a cell covered by two policies must still
//! count against exactly one, so the entries are cut along every boundary
//! first. Each cell carries the smallest policy index among the entries
//! covering it (deterministic attribution), and neighbouring cells with the
//! same contents are merged back so the map stays small.

use std::collections::HashMap;
use std::rc::Rc;

/// An inclusive range.
pub type Range<T> = (T, T);

/// One allow entry before cutting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry<A> {
    pub addr: Range<A>,
    pub proto: Range<u8>,
    pub port: Range<u16>,
    /// Index of the policy (its counter) that allowed this entry.
    pub policy: usize,
}

/// One disjoint cell: addr × proto × port → policy.
pub type Cell<A> = Entry<A>;

/// An address type: u32 for IPv4, u128 for IPv6.
pub trait Addr: Copy + Ord + std::fmt::Debug {
    const MAX: Self;
    /// self + 1, or None at the top of the space.
    fn next(self) -> Option<Self>;
    fn prev(self) -> Self;
}

impl Addr for u32 {
    const MAX: Self = u32::MAX;
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Self {
        self - 1
    }
}

impl Addr for u128 {
    const MAX: Self = u128::MAX;
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Self {
        self - 1
    }
}

/// Disjoint port ranges with their policy.
type Ports = Vec<(Range<u16>, usize)>;

/// A (proto × port) pattern: disjoint, sorted (proto range, port range, policy).
type Pattern = Vec<(Range<u8>, Range<u16>, usize)>;

/// Cuts `entries` into disjoint cells, sorted by address.
///
/// A sweep over the address boundaries: at each boundary the entries that
/// end before it leave the active set and those that start at it join;
/// each elementary interval gets the (proto × port) pattern of its active
/// entries. Patterns are memoized by the active entries' (proto, port,
/// policy) boxes: pod peers come in many addresses with the same ports, so
/// most intervals reuse a pattern computed once.
pub fn disjoint<A: Addr>(entries: &[Entry<A>]) -> Vec<Cell<A>> {
    // (point, starts here?, entry): ends sort before starts at one point.
    let mut events: Vec<(A, bool, usize)> = Vec::with_capacity(entries.len() * 2);
    for (i, e) in entries.iter().enumerate() {
        events.push((e.addr.0, true, i));
        if let Some(after) = e.addr.1.next() {
            events.push((after, false, i));
        }
    }
    events.sort_unstable();
    let mut memo: HashMap<Vec<Box3>, Rc<Pattern>> = HashMap::new();
    let mut active: Vec<usize> = Vec::new();
    let mut runs: Vec<(Range<A>, Rc<Pattern>)> = Vec::new();
    let mut key: Vec<Box3> = Vec::new();
    let mut k = 0;
    while k < events.len() {
        let point = events[k].0;
        while k < events.len() && events[k].0 == point {
            let (_, start, i) = events[k];
            if start {
                active.push(i);
            } else if let Some(pos) = active.iter().position(|&a| a == i) {
                active.swap_remove(pos);
            }
            k += 1;
        }
        if active.is_empty() {
            continue;
        }
        let hi = match events.get(k) {
            Some(next) => next.0.prev(),
            None => A::MAX,
        };
        key.clear();
        key.extend(active.iter().map(|&i| {
            let e = &entries[i];
            (e.proto, e.port, e.policy)
        }));
        key.sort_unstable();
        let pattern = match memo.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Rc::new(pattern(key.iter()));
                memo.insert(key.clone(), p.clone());
                p
            }
        };
        // Single addresses (pod peers) stay single even next to an equal
        // neighbour: they then live in the datapath's hash maps, where a
        // pod coming or going is one element, instead of reshaping a range.
        match runs.last_mut() {
            Some((range, last))
                if (Rc::ptr_eq(last, &pattern) || **last == *pattern)
                    && range.1.next() == Some(point)
                    && range.0 != range.1
                    && point != hi =>
            {
                range.1 = hi;
            }
            _ => runs.push(((point, hi), pattern)),
        }
    }
    let mut out = Vec::with_capacity(runs.len());
    for (addr, pattern) in runs {
        out.extend(pattern.iter().map(|&(proto, port, policy)| Entry {
            addr,
            proto,
            port,
            policy,
        }));
    }
    out
}

/// An entry's (proto range, port range, policy).
type Box3 = (Range<u8>, Range<u16>, usize);

/// The disjoint (proto × port) pattern of the entries active on one
/// address interval.
fn pattern<'a>(active: impl Iterator<Item = &'a Box3>) -> Pattern {
    let boxes: Vec<Box3> = active.copied().collect();
    // Protocol boundaries, then per elementary protocol interval the
    // disjoint port ranges.
    let mut cuts: Vec<u16> = boxes
        .iter()
        .flat_map(|b| [u16::from(b.0 .0), u16::from(b.0 .1) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(Range<u8>, Ports)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0] as u8, (w[1] - 1) as u8);
        let ports = ports(boxes.iter().filter(|b| b.0 .0 <= lo && hi <= b.0 .1));
        if ports.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((range, last)) if *last == ports && u16::from(range.1) + 1 == u16::from(lo) => {
                range.1 = hi;
            }
            _ => out.push(((lo, hi), ports)),
        }
    }
    out.into_iter()
        .flat_map(|(proto, ports)| ports.into_iter().map(move |(port, p)| (proto, port, p)))
        .collect()
}

/// Disjoint port ranges with the smallest policy covering each.
fn ports<'a>(
    boxes: impl Iterator<Item = &'a (Range<u8>, Range<u16>, usize)>,
) -> Vec<(Range<u16>, usize)> {
    let boxes: Vec<(Range<u16>, usize)> = boxes.map(|b| (b.1, b.2)).collect();
    let mut cuts: Vec<u32> = boxes
        .iter()
        .flat_map(|b| [u32::from(b.0 .0), u32::from(b.0 .1) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(Range<u16>, usize)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
        let Some(policy) = boxes
            .iter()
            .filter(|b| b.0 .0 <= lo && hi <= b.0 .1)
            .map(|b| b.1)
            .min()
        else {
            continue;
        };
        match out.last_mut() {
            Some((range, p)) if *p == policy && u32::from(range.1) + 1 == u32::from(lo) => {
                range.1 = hi;
            }
            _ => out.push(((lo, hi), policy)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The sweep as first written (BTreeMaps, no memo): the oracle for
    /// [`disjoint`].
    fn disjoint_reference<A: Addr>(entries: &[Entry<A>]) -> Vec<Cell<A>> {
        // Sweep over address boundaries: at each start the entry becomes
        // active, after each end it stops.
        let mut bounds: BTreeMap<A, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            bounds.entry(e.addr.0).or_default().0.push(i);
            if let Some(after) = e.addr.1.next() {
                bounds.entry(after).or_default().1.push(i);
            }
        }
        let points: Vec<A> = bounds.keys().copied().collect();
        let mut active: BTreeMap<usize, ()> = BTreeMap::new();
        // (addr range, pattern) runs, merged when adjacent and equal.
        let mut runs: Vec<(Range<A>, Pattern)> = Vec::new();
        for (k, point) in points.iter().enumerate() {
            let (starts, ends) = &bounds[point];
            for i in ends {
                active.remove(i);
            }
            for &i in starts {
                active.insert(i, ());
            }
            if active.is_empty() {
                continue;
            }
            let hi = match points.get(k + 1) {
                Some(next) => next.prev(),
                None => A::MAX,
            };
            let boxes: Vec<Box3> = active
                .keys()
                .map(|&i| (entries[i].proto, entries[i].port, entries[i].policy))
                .collect();
            let pattern = pattern(boxes.iter());
            // Single addresses (pod peers) stay single even next to an equal
            // neighbour: they then live in the datapath's hash maps, where a
            // pod coming or going is one element, instead of reshaping a range.
            match runs.last_mut() {
                Some((range, last))
                    if *last == pattern
                        && range.1.next() == Some(*point)
                        && range.0 != range.1
                        && *point != hi =>
                {
                    range.1 = hi;
                }
                _ => runs.push(((*point, hi), pattern)),
            }
        }
        runs.into_iter()
            .flat_map(|(addr, pattern)| {
                pattern.into_iter().map(move |(proto, port, policy)| Entry {
                    addr,
                    proto,
                    port,
                    policy,
                })
            })
            .collect()
    }

    #[test]
    fn the_memoized_sweep_gives_exactly_the_reference_cells() {
        // A small deterministic generator (no rand dependency).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..300 {
            let mut entries = Vec::new();
            for _ in 0..(1 + next(40)) {
                let a = next(64) as u32;
                let b = if next(3) == 0 { a + next(20) as u32 } else { a };
                let (p0, p1) = match next(4) {
                    0 => (0, 255),
                    1 => (6, 6),
                    2 => (17, 17),
                    _ => (6, 17),
                };
                let lo = [0u16, 53, 80, 443, 8000][next(5) as usize];
                let hi = if next(4) == 0 {
                    65535
                } else {
                    lo + next(10) as u16
                };
                entries.push(e((a, b), (p0, p1), (lo, hi), next(5) as usize));
            }
            if next(5) == 0 {
                entries.push(e((0, u32::MAX), (0, 255), (0, 65535), 4));
            }
            assert_eq!(
                disjoint(&entries),
                disjoint_reference(&entries),
                "round {round}: {entries:?}"
            );
        }
    }

    fn e(addr: (u32, u32), proto: (u8, u8), port: (u16, u16), policy: usize) -> Entry<u32> {
        Entry {
            addr,
            proto,
            port,
            policy,
        }
    }

    /// Brute force: which policy (smallest) allows (a, proto, port)?
    fn lookup(cells: &[Cell<u32>], a: u32, pr: u8, po: u16) -> Option<usize> {
        let hits: Vec<_> = cells
            .iter()
            .filter(|c| {
                c.addr.0 <= a
                    && a <= c.addr.1
                    && c.proto.0 <= pr
                    && pr <= c.proto.1
                    && c.port.0 <= po
                    && po <= c.port.1
            })
            .collect();
        assert!(hits.len() <= 1, "cells overlap at {a} {pr} {po}: {hits:?}");
        hits.first().map(|c| c.policy)
    }

    fn truth(entries: &[Entry<u32>], a: u32, pr: u8, po: u16) -> Option<usize> {
        entries
            .iter()
            .filter(|c| {
                c.addr.0 <= a
                    && a <= c.addr.1
                    && c.proto.0 <= pr
                    && pr <= c.proto.1
                    && c.port.0 <= po
                    && po <= c.port.1
            })
            .map(|c| c.policy)
            .min()
    }

    #[test]
    fn cells_are_disjoint_and_equivalent() {
        let entries = vec![
            e((10, 20), (6, 6), (80, 81), 3),
            e((15, 30), (6, 6), (81, 90), 1),
            e((15, 15), (0, 255), (0, 65535), 2),
            e((0, u32::MAX), (17, 17), (53, 53), 4),
            e((25, 40), (6, 17), (1000, 2000), 0),
        ];
        let cells = disjoint(&entries);
        for a in [0, 9, 10, 14, 15, 16, 20, 21, 25, 30, 31, 40, 41, u32::MAX] {
            for pr in [0, 1, 6, 7, 16, 17, 18, 255] {
                for po in [
                    0, 53, 79, 80, 81, 82, 90, 91, 999, 1000, 1500, 2000, 2001, 65535,
                ] {
                    assert_eq!(
                        lookup(&cells, a, pr, po),
                        truth(&entries, a, pr, po),
                        "{a} {pr} {po}"
                    );
                }
            }
        }
    }

    #[test]
    fn adjacent_equal_ranges_merge_single_addresses_do_not() {
        let entries = vec![
            e((0, 9), (6, 6), (80, 80), 0),
            e((10, 19), (6, 6), (80, 80), 0),
            e((20, 20), (6, 6), (80, 80), 0),
            e((21, 21), (6, 6), (80, 80), 0),
        ];
        assert_eq!(
            disjoint(&entries),
            vec![
                e((0, 19), (6, 6), (80, 80), 0),
                e((20, 20), (6, 6), (80, 80), 0),
                e((21, 21), (6, 6), (80, 80), 0),
            ]
        );
    }
}
