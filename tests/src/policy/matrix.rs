//! Reachability truth tables: one from × to matrix per (port, protocol),
//! expected ones computed from the oracle, observed ones from probes, and a
//! printable report of where they disagree (in the manner of the e2e and
//! cyclonus truth tables).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::oracle::{self, Cluster, PodRef, Proto};

/// One (port, protocol) combination to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Probe {
    pub port: u16,
    pub proto: Proto,
}

impl Probe {
    pub const fn new(port: u16, proto: Proto) -> Probe {
        Probe { port, proto }
    }
    pub const fn tcp(port: u16) -> Probe {
        Probe::new(port, Proto::Tcp)
    }
    pub const fn udp(port: u16) -> Probe {
        Probe::new(port, Proto::Udp)
    }
    pub const fn sctp(port: u16) -> Probe {
        Probe::new(port, Proto::Sctp)
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// The probes a scenario uses unless it says otherwise: 80 and 81 over TCP
/// and UDP.
pub const DEFAULT_PROBES: [Probe; 4] = [
    Probe::tcp(80),
    Probe::tcp(81),
    Probe::udp(80),
    Probe::udp(81),
];

/// The ports the probe servers must listen on for every scenario.
pub const SERVED_PORTS: [u16; 2] = [80, 81];

/// One cell of a truth table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    Allowed,
    Denied,
    /// Not measured (SCTP on a kernel without it); never compared.
    NotProbed,
}

impl Cell {
    pub fn from_bool(allowed: bool) -> Cell {
        if allowed {
            Cell::Allowed
        } else {
            Cell::Denied
        }
    }

    /// Grid symbol: `+` allowed, `-` denied, `?` not probed.
    pub fn symbol(self) -> char {
        match self {
            Cell::Allowed => '+',
            Cell::Denied => '-',
            Cell::NotProbed => '?',
        }
    }
}

/// A from × to truth table for one probe. Rows are sources, columns are
/// destinations, both in `pods` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub probe: Probe,
    pub pods: Vec<PodRef>,
    cells: Vec<Cell>,
}

impl Matrix {
    /// A matrix with every cell set to `fill`.
    pub fn new(probe: Probe, pods: Vec<PodRef>, fill: Cell) -> Matrix {
        let n = pods.len();
        Matrix {
            probe,
            pods,
            cells: vec![fill; n * n],
        }
    }

    /// Parses a hand-written grid: one row per source in `pods` order, each
    /// row holding one `+` (allowed), `-` (denied) or `?` per destination.
    /// Whitespace is ignored, and so is anything up to a `|` on a line, so
    /// rows may carry a label: `x/a | + - - + + + + + +`.
    pub fn from_grid(probe: Probe, pods: Vec<PodRef>, grid: &str) -> Matrix {
        let mut m = Matrix::new(probe, pods, Cell::NotProbed);
        let rows: Vec<Vec<Cell>> = grid
            .lines()
            .map(|l| l.rsplit_once('|').map_or(l, |(_, r)| r))
            .map(|l| {
                l.chars()
                    .filter(|c| !c.is_whitespace())
                    .map(|c| match c {
                        '+' => Cell::Allowed,
                        '-' => Cell::Denied,
                        '?' => Cell::NotProbed,
                        other => panic!("grid symbol {other:?} is not + - ?"),
                    })
                    .collect::<Vec<Cell>>()
            })
            .filter(|r| !r.is_empty())
            .collect();
        let n = m.pods.len();
        assert_eq!(rows.len(), n, "grid has {} rows, want {n}", rows.len());
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.len(), n, "grid row {i} has {} cells", row.len());
            for (j, c) in row.iter().enumerate() {
                m.cells[i * n + j] = *c;
            }
        }
        m
    }

    fn index(&self, r: &PodRef) -> usize {
        self.pods
            .iter()
            .position(|p| p == r)
            .unwrap_or_else(|| panic!("{r} is not in the matrix"))
    }

    pub fn get(&self, from: &PodRef, to: &PodRef) -> Cell {
        let n = self.pods.len();
        self.cells[self.index(from) * n + self.index(to)]
    }

    pub fn set(&mut self, from: &PodRef, to: &PodRef, cell: Cell) {
        let n = self.pods.len();
        let i = self.index(from) * n + self.index(to);
        self.cells[i] = cell;
    }

    /// How many cells hold `cell`.
    pub fn count(&self, cell: Cell) -> usize {
        self.cells.iter().filter(|c| **c == cell).count()
    }

    /// The grid as text, one row per source.
    pub fn render(&self) -> String {
        grid_lines(&self.probe.to_string(), &self.pods, |i, j| {
            self.cells[i * self.pods.len() + j].symbol()
        })
        .join("\n")
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Lines of a labelled grid: a header of destination names, then one line
/// per source.
fn grid_lines(title: &str, pods: &[PodRef], sym: impl Fn(usize, usize) -> char) -> Vec<String> {
    let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
    let w = names.iter().map(String::len).max().unwrap_or(3).max(3) + 1;
    let label_w = w.max(title.len() + 1);
    let mut out = Vec::new();
    let mut head = format!("{title:<label_w$}");
    for n in &names {
        head.push_str(&format!("{n:>w$}"));
    }
    out.push(head);
    for (i, n) in names.iter().enumerate() {
        let mut line = format!("{n:<label_w$}");
        for j in 0..names.len() {
            line.push_str(&format!("{:>w$}", sym(i, j)));
        }
        out.push(line);
    }
    out
}

/// Truth tables for a set of probes over the same pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reachability {
    pub pods: Vec<PodRef>,
    pub matrices: Vec<Matrix>,
    /// Remarks from whoever produced the tables (e.g. a probe that reached
    /// the wrong server); printed with any report.
    pub notes: Vec<String>,
    /// How long probing took (observed tables only).
    pub elapsed: Option<Duration>,
}

impl Reachability {
    pub fn new(pods: Vec<PodRef>, probes: &[Probe], fill: Cell) -> Reachability {
        Reachability {
            matrices: probes
                .iter()
                .map(|p| Matrix::new(*p, pods.clone(), fill))
                .collect(),
            pods,
            notes: Vec::new(),
            elapsed: None,
        }
    }

    pub fn probes(&self) -> Vec<Probe> {
        self.matrices.iter().map(|m| m.probe).collect()
    }

    pub fn matrix(&self, probe: Probe) -> Option<&Matrix> {
        self.matrices.iter().find(|m| m.probe == probe)
    }

    pub fn matrix_mut(&mut self, probe: Probe) -> Option<&mut Matrix> {
        self.matrices.iter_mut().find(|m| m.probe == probe)
    }

    /// Compares these (expected) tables with `observed`. Cells that either
    /// side did not probe are skipped. `Err` carries a printable report
    /// with expected, observed and diff grids for every probe that differs.
    pub fn compare(&self, observed: &Reachability) -> Result<(), Report> {
        let mut text = String::new();
        let mut mismatches = 0usize;
        let mut skipped = BTreeSet::new();
        let mut lines = Vec::new();
        for exp in &self.matrices {
            let Some(obs) = observed.matrix(exp.probe) else {
                mismatches += 1;
                text.push_str(&format!("{}: not observed at all\n\n", exp.probe));
                continue;
            };
            let pods = &exp.pods;
            let mut diff = vec!['.'; pods.len() * pods.len()];
            let mut here = 0;
            for (i, from) in pods.iter().enumerate() {
                for (j, to) in pods.iter().enumerate() {
                    let e = exp.get(from, to);
                    let o = if obs.pods.contains(from) && obs.pods.contains(to) {
                        obs.get(from, to)
                    } else {
                        Cell::NotProbed
                    };
                    let d = match (e, o) {
                        (Cell::NotProbed, _) | (_, Cell::NotProbed) => {
                            skipped.insert(exp.probe);
                            '?'
                        }
                        (Cell::Allowed, Cell::Denied) => 'X',
                        (Cell::Denied, Cell::Allowed) => '!',
                        _ => '.',
                    };
                    if d == 'X' || d == '!' {
                        here += 1;
                        lines.push(format!(
                            "  {from} -> {to} {}: expected {}, observed {}",
                            exp.probe,
                            word(e),
                            word(o)
                        ));
                    }
                    diff[i * pods.len() + j] = d;
                }
            }
            if here == 0 {
                continue;
            }
            mismatches += here;
            let n = pods.len();
            let a = grid_lines(&format!("expected {}", exp.probe), pods, |i, j| {
                exp.get(&pods[i], &pods[j]).symbol()
            });
            let b = grid_lines("observed", pods, |i, j| {
                if obs.pods.contains(&pods[i]) && obs.pods.contains(&pods[j]) {
                    obs.get(&pods[i], &pods[j]).symbol()
                } else {
                    '?'
                }
            });
            let c = grid_lines(&format!("diff ({here})"), pods, |i, j| diff[i * n + j]);
            let wa = a.iter().map(String::len).max().unwrap_or(0);
            let wb = b.iter().map(String::len).max().unwrap_or(0);
            for ((la, lb), lc) in a.iter().zip(&b).zip(&c) {
                text.push_str(&format!("{la:<wa$}   {lb:<wb$}   {lc}\n"));
            }
            text.push('\n');
        }
        if mismatches == 0 {
            return Ok(());
        }
        let mut out = format!(
            "{mismatches} reachability cell(s) differ from the expectation \
             (rows: from, columns: to; + allowed, - denied, ? not probed; \
             diff: . match, X expected allowed but denied, ! expected denied but allowed)\n\n"
        );
        out.push_str(&text);
        const MAX_LINES: usize = 60;
        for l in lines.iter().take(MAX_LINES) {
            out.push_str(l);
            out.push('\n');
        }
        if lines.len() > MAX_LINES {
            out.push_str(&format!("  ... and {} more\n", lines.len() - MAX_LINES));
        }
        if !skipped.is_empty() {
            let s: Vec<String> = skipped.iter().map(ToString::to_string).collect();
            out.push_str(&format!("not compared (not probed): {}\n", s.join(", ")));
        }
        for n in self.notes.iter().chain(&observed.notes) {
            out.push_str(&format!("note: {n}\n"));
        }
        if let Some(t) = observed.elapsed {
            out.push_str(&format!("probing took {t:?}\n"));
        }
        Err(Report {
            mismatches,
            text: out,
        })
    }

    /// All tables as text.
    pub fn render(&self) -> String {
        self.matrices
            .iter()
            .map(Matrix::render)
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

fn word(c: Cell) -> &'static str {
    match c {
        Cell::Allowed => "allowed",
        Cell::Denied => "denied",
        Cell::NotProbed => "not probed",
    }
}

/// Why an observed reachability differs from the expected one; its
/// `Display` is the full report (grids and the list of differing cells).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub mismatches: usize,
    pub text: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Report {}

/// The expected truth tables for `probes` over every pod of `cluster`
/// (in cluster order), computed with [`oracle::allowed`].
pub fn expected(cluster: &Cluster, policies: &[NetworkPolicy], probes: &[Probe]) -> Reachability {
    let pods = cluster.pod_refs();
    let mut r = Reachability::new(pods.clone(), probes, Cell::NotProbed);
    for m in &mut r.matrices {
        for from in &pods {
            for to in &pods {
                let ok = oracle::allowed(cluster, policies, from, to, m.probe.port, m.probe.proto);
                m.set(from, to, Cell::from_bool(ok));
            }
        }
    }
    r
}
