//! A recording fake of [`Netlink`] for unit tests that need no root: it logs
//! each request's label, answers lookups from a preset link table, and fails
//! requests whose label starts with a scripted prefix.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

use super::{Addr, Failed, Link, Netlink, Request, Route};

#[derive(Debug, Default)]
pub struct Fake {
    /// Labels of every request sent, in order.
    pub log: Vec<String>,
    /// Links `link`/`links` report, by name.
    pub links: HashMap<String, Link>,
    /// (label prefix, errno): the next request matching fails once.
    pub fail: Vec<(String, i32)>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    /// Addresses `local_ips` leaves out (by default every address in `addrs`
    /// and every one a request added counts as local at once).
    pub not_local: Vec<IpAddr>,
}

impl Fake {
    pub fn with_link(mut self, name: &str, index: u32, mac: [u8; 6], alias: Option<&str>) -> Fake {
        self.links.insert(
            name.into(),
            Link {
                index,
                name: name.into(),
                mac: mac.to_vec(),
                mtu: 1500,
                up: true,
                alias: alias.map(str::to_string),
                link: None,
                oper_up: true,
            },
        );
        self
    }

    pub fn failing(mut self, prefix: &str, errno: i32) -> Fake {
        self.fail.push((prefix.into(), errno));
        self
    }

    /// How many requests whose label starts with `prefix` were sent.
    pub fn count(&self, prefix: &str) -> usize {
        self.log.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// Whether a request whose label starts with `prefix` was sent.
    pub fn sent(&self, prefix: &str) -> bool {
        self.count(prefix) > 0
    }
}

impl Netlink for Fake {
    fn batch(&mut self, requests: Vec<Request>) -> Result<(), Failed> {
        let mut first = None;
        for r in requests {
            self.log.push(r.what.clone());
            if let Some(pos) = self
                .fail
                .iter()
                .position(|(p, _)| r.what.starts_with(p.as_str()))
            {
                let (_, errno) = self.fail.remove(pos);
                first.get_or_insert(Failed {
                    what: r.what,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
    fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        Ok(self.links.get(name).cloned())
    }
    fn links(&mut self) -> io::Result<Vec<Link>> {
        Ok(self.links.values().cloned().collect())
    }
    fn addrs(&mut self) -> io::Result<Vec<Addr>> {
        Ok(self.addrs.clone())
    }
    fn routes(&mut self) -> io::Result<Vec<Route>> {
        Ok(self.routes.clone())
    }
    fn local_ips(&mut self) -> io::Result<Vec<IpAddr>> {
        let added = self
            .log
            .iter()
            .filter_map(|l| l.strip_prefix("add address "))
            .filter_map(|l| l.split('/').next()?.parse().ok());
        Ok(self
            .addrs
            .iter()
            .map(|a| a.ip)
            .chain(added)
            .filter(|ip| !self.not_local.contains(ip))
            .collect())
    }
}
