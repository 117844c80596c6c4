//! Cutting connections a policy change denies. Conntrack would otherwise
//! keep passing an established connection (the `established` rule comes
//! before policy), so after each change every entry that involves a local
//! pod is checked against the new rules and the denied ones are deleted.
//! The table's "no new connection without SYN" rule then keeps the next
//! packet of such a connection from being picked up again mid-stream.
//!
//! Uses the `conntrack` tool (Debian package conntrack), the same
//! ctnetlink requests without a netlink implementation of our own.

use std::net::IpAddr;
use std::process::Command;

use crate::policy::Compiled;
use crate::{Error, Result};

/// One entry's original direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// A TCP entry in TIME_WAIT or CLOSE: no connection left to cut.
    pub dead: bool,
}

/// Parses `conntrack -L` output (first src/dst/sport/dport of each line).
pub fn parse(text: &str) -> Vec<Flow> {
    text.lines()
        .filter_map(|line| {
            let dead = line.contains(" TIME_WAIT ") || line.contains(" CLOSE ");
            let mut it = line.split_whitespace();
            let _name = it.next()?;
            let proto: u8 = it.next()?.parse().ok()?;
            let (mut src, mut dst, mut sport, mut dport) = (None, None, None, None);
            for field in it {
                let (k, v) = match field.split_once('=') {
                    Some(kv) => kv,
                    None => continue,
                };
                match k {
                    "src" if src.is_none() => src = v.parse().ok(),
                    "dst" if dst.is_none() => dst = v.parse().ok(),
                    "sport" if sport.is_none() => sport = v.parse().ok(),
                    "dport" if dport.is_none() => dport = v.parse().ok(),
                    _ => {}
                }
            }
            Some(Flow {
                proto,
                src: src?,
                dst: dst?,
                sport,
                dport,
                dead,
            })
        })
        .collect()
}

fn run(args: &[String]) -> Result<String> {
    let out = Command::new("conntrack").args(args).output().map_err(|e| {
        Error::Conntrack(format!(
            "cannot run conntrack (Debian package conntrack): {e}"
        ))
    })?;
    // `-D` exits 1 when the entry is already gone: not an error.
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the entries of local pods that `rules` no longer allows;
/// returns how many (source, destination, protocol, port) groups were cut.
///
/// The verdict depends only on that quadruple, so all connections sharing
/// it go in one `conntrack -D` (any source port). TCP entries already in
/// TIME_WAIT or CLOSE carry no traffic and are left to expire.
pub fn cut_denied(rules: &Compiled) -> Result<usize> {
    let local: std::collections::HashSet<IpAddr> = rules
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    let mut cut = 0;
    for family in ["ipv4", "ipv6"] {
        let listing = run(&["-L".into(), "-f".into(), family.into()])?;
        let mut groups = std::collections::BTreeSet::new();
        for f in parse(&listing) {
            if f.dead || (!local.contains(&f.src) && !local.contains(&f.dst)) {
                continue;
            }
            if !rules.allows(f.src, f.dst, f.proto, f.dport.unwrap_or(0)) {
                groups.insert((f.proto, f.src, f.dst, f.dport));
            }
        }
        for (proto, src, dst, dport) in groups {
            let mut args: Vec<String> = vec![
                "-D".into(),
                "-f".into(),
                family.into(),
                "-p".into(),
                proto.to_string(),
                "-s".into(),
                src.to_string(),
                "-d".into(),
                dst.to_string(),
            ];
            if let Some(d) = dport {
                args.extend(["--dport".into(), d.to_string()]);
            }
            run(&args)?;
            cut += 1;
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listing_lines() {
        let flows = parse(
            "tcp      6 431999 ESTABLISHED src=10.244.0.2 dst=10.244.0.3 sport=41234 dport=80 src=10.244.0.3 dst=10.244.0.2 sport=80 dport=41234 [ASSURED] mark=0 use=1\n\
             icmp     1 29 src=10.244.0.2 dst=10.244.0.3 type=8 code=0 id=5 src=10.244.0.3 dst=10.244.0.2 type=0 code=0 id=5 mark=0 use=1\n\
             conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n",
        );
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].dport, Some(80));
        assert_eq!(flows[1].proto, 1);
        assert_eq!(flows[1].dport, None);
    }
}
