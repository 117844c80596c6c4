//! A transaction for nodeplane's table as data: text commands for
//! structure (tables, chains, rules, maps, counters) and element steps kept
//! as values, so a transaction that only adds and deletes elements (the
//! usual policy change) can go to the kernel over netlink directly
//! ([`crate::nftnl`]) instead of through `nft -f`, whose parser costs about
//! 20 µs per element.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// One field of a set key, as the table's set types declare them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// `inet_proto`.
    Proto(u8),
    /// `inet_service`.
    Port(u16),
    /// `ifname`.
    Iface(String),
    /// Written as is; only `nft -f` can apply it (e.g. a CIDR in a plain
    /// interval set, which netlink would need split into interval ends).
    Text(String),
}

/// What a map element maps to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    /// A set element (no value).
    None,
    /// A named counter (objref map).
    Counter(String),
    /// `jump <chain>` (verdict map).
    Jump(String),
}

/// One set or map element: a key, for interval maps the key's upper end,
/// and its value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Elem {
    pub key: Vec<Field>,
    pub end: Option<Vec<Field>>,
    pub value: Value,
}

impl Elem {
    pub fn set(key: Vec<Field>) -> Elem {
        Elem {
            key,
            end: None,
            value: Value::None,
        }
    }

    fn needs_text(&self) -> bool {
        self.key
            .iter()
            .chain(self.end.iter().flatten())
            .any(|f| matches!(f, Field::Text(_)))
    }

    fn key_text(&self) -> String {
        let parts: Vec<String> = match &self.end {
            None => self.key.iter().map(field_text).collect(),
            Some(end) => self
                .key
                .iter()
                .zip(end)
                .map(|(lo, hi)| {
                    if lo == hi {
                        field_text(lo)
                    } else {
                        format!("{}-{}", field_text(lo), field_text(hi))
                    }
                })
                .collect(),
        };
        parts.join(" . ")
    }

    fn text(&self) -> String {
        match &self.value {
            Value::None => self.key_text(),
            Value::Counter(c) => format!("{} : \"{c}\"", self.key_text()),
            Value::Jump(chain) => format!("{} : jump {chain}", self.key_text()),
        }
    }
}

fn field_text(f: &Field) -> String {
    match f {
        Field::V4(a) => a.to_string(),
        Field::V6(a) => a.to_string(),
        Field::Proto(p) => p.to_string(),
        Field::Port(p) => p.to_string(),
        Field::Iface(n) => format!("\"{}\"", n.replace('"', "")),
        Field::Text(t) => t.clone(),
    }
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `nft` commands, one per line.
    Text(String),
    /// Add (`true`) or delete elements of one set or map.
    Elements {
        add: bool,
        set: String,
        elems: Vec<Elem>,
    },
}

/// A transaction: steps in order, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    pub table: String,
    pub steps: Vec<Step>,
}

impl Script {
    pub fn new(table: &str) -> Script {
        Script {
            table: table.to_string(),
            steps: Vec::new(),
        }
    }

    pub fn add(&mut self, set: &str, elems: Vec<Elem>) {
        self.elements(true, set, elems);
    }

    pub fn delete(&mut self, set: &str, elems: Vec<Elem>) {
        self.elements(false, set, elems);
    }

    fn elements(&mut self, add: bool, set: &str, elems: Vec<Elem>) {
        if !elems.is_empty() {
            self.steps.push(Step::Elements {
                add,
                set: set.to_string(),
                elems,
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|s| match s {
            Step::Text(t) => t.trim().is_empty(),
            Step::Elements { elems, .. } => elems.is_empty(),
        })
    }

    /// True when every step adds or deletes elements that netlink can
    /// carry: nothing structural.
    pub fn elements_only(&self) -> bool {
        self.steps.iter().all(|s| match s {
            Step::Text(t) => t.trim().is_empty(),
            Step::Elements { elems, .. } => !elems.iter().any(Elem::needs_text),
        })
    }

    /// Splits the steps into (text, elements, text) runs, if they come in
    /// that order; None when text and elements interleave otherwise.
    pub fn phases(&self) -> Option<(Script, Script, Script)> {
        let mut parts = [
            Script::new(&self.table),
            Script::new(&self.table),
            Script::new(&self.table),
        ];
        let mut phase = 0;
        for step in &self.steps {
            let is_text = matches!(step, Step::Text(_));
            phase = match (phase, is_text) {
                (0, true) => 0,
                (0 | 1, false) => 1,
                (1 | 2, true) => 2,
                _ => return None,
            };
            parts[phase].steps.push(step.clone());
        }
        let [a, b, c] = parts;
        Some((a, b, c))
    }

    /// How many elements the transaction adds or deletes.
    pub fn element_count(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Elements { elems, .. } => elems.len(),
                Step::Text(_) => 0,
            })
            .sum()
    }

    /// The transaction as an `nft -f` script.
    pub fn text(&self) -> String {
        let t = &self.table;
        let mut out = String::new();
        for s in &self.steps {
            match s {
                Step::Text(text) => out.push_str(text),
                Step::Elements { add, set, elems } => {
                    let verb = if *add { "add" } else { "delete" };
                    for chunk in elems.chunks(2000) {
                        let list: Vec<String> = chunk
                            .iter()
                            .map(|e| if *add { e.text() } else { e.key_text() })
                            .collect();
                        let _ = writeln!(
                            out,
                            "{verb} element inet {t} {set} {{ {} }}",
                            list.join(", ")
                        );
                    }
                }
            }
        }
        out
    }
}

/// `writeln!(script, ...)` appends an `nft` command.
impl std::fmt::Write for Script {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        match self.steps.last_mut() {
            Some(Step::Text(t)) => t.push_str(s),
            _ => self.steps.push(Step::Text(s.to_string())),
        }
        Ok(())
    }
}
