//! What the benchmarks (`tests/src/bin/*-bench`) share: clean-up when they
//! die ([`guard`]), CPU time from /proc ([`cpu`]), and the target verdicts
//! they print ([`Report`]).

pub mod cpu;
pub mod guard;

/// Target verdicts and errors collected for a bench's summary.
#[derive(Debug, Default)]
pub struct Report {
    pub targets: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    /// Prints and records one target verdict.
    pub fn target(&mut self, what: &str, value: String, pass: bool) {
        let line = format!("{what}: {value} → {}", if pass { "PASS" } else { "MISS" });
        println!("  target  {line}");
        self.targets.push(line);
    }

    /// The closing summary: every verdict again, then the errors.
    pub fn print_summary(&self) {
        println!("\n== summary ==");
        for t in &self.targets {
            println!("  {t}");
        }
        if !self.errors.is_empty() {
            println!("\n== errors ==");
            for e in &self.errors {
                println!("  {e}");
            }
        }
    }
}
