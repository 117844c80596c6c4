//! Optional log file (`logFile`, `logLevel` in the configuration). The
//! runtime owns stdout and often discards stderr, so a file is the only
//! durable trace of what a short-lived plugin did. Logging never fails a call.

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogLevel;

#[derive(Debug, Default)]
pub struct Log {
    file: Option<PathBuf>,
    level: Option<LogLevel>,
}

impl Log {
    pub fn new(file: Option<PathBuf>, level: LogLevel) -> Log {
        Log {
            level: file.as_ref().map(|_| level),
            file,
        }
    }

    pub fn enabled(&self, level: LogLevel) -> bool {
        self.level.is_some_and(|l| level <= l)
    }

    /// Appends one line: `<unix time> <level> <message>`.
    pub fn write(&self, level: LogLevel, msg: &str) {
        if !self.enabled(level) {
            return;
        }
        let Some(path) = &self.file else { return };
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{}.{:06} {:?} {msg}\n",
            t.as_secs(),
            t.subsec_micros(),
            level
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
