//! `bindings.cron` (<https://docs.dapr.io/reference/components-reference/supported-bindings/cron/>):
//! an input binding that fires on a schedule (metadata `schedule`).
//!
//! Schedules are read as Dapr reads them (robfig/cron with optional
//! seconds and descriptors):
//! - `@every <duration>` (`@every 15s`, `@every 1h30m`; under 1 s is 1 s):
//!   every interval from when the binding starts;
//! - `@yearly` / `@annually`, `@monthly`, `@weekly`, `@daily` /
//!   `@midnight`, `@hourly`;
//! - five fields (minute hour day-of-month month day-of-week) or six
//!   (seconds first), each `*`, `?` (day fields), a value, a range `a-b`,
//!   a step `*/n`, `a-b/n` or `a/n`, or a comma list of those; months
//!   `JAN`-`DEC` and days `SUN`-`SAT` by name. When both day fields are
//!   restricted, a day matching either fires (cron's rule).
//!
//! Times are UTC (Dapr uses the process's local zone, which in a
//! container is normally UTC); `CRON_TZ=UTC` / `TZ=UTC` prefixes are
//! accepted, other zones are refused by name.
//!
//! Other metadata: `route` (the app path, default `/{name}`), `direction`,
//! and the delivery retry keys of pub/sub (`maxDeliveryAttempts`,
//! `retryInitialInterval`, `retryMaxInterval`; see [`crate::subscriptions::RetryPolicy`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodeplane_state::ComponentSpec;

use super::{Directions, OpenError};
use crate::subscriptions::RetryPolicy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronBinding {
    pub schedule: Schedule,
    /// The text, for messages.
    pub schedule_text: String,
    /// Where firings are POSTed on the app.
    pub route: String,
    pub directions: Directions,
    pub retry: RetryPolicy,
}

impl CronBinding {
    pub fn open(spec: &ComponentSpec) -> Result<CronBinding, OpenError> {
        let bad = |m: String| OpenError::Config(format!("{} (bindings.cron): {m}", spec.name));
        let text = spec
            .metadata
            .get("schedule")
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                bad("metadata schedule is required, e.g. \"@every 15s\" or \"0 30 * * * *\"".into())
            })?;
        let schedule =
            Schedule::parse(text).map_err(|e| bad(format!("metadata schedule {text:?}: {e}")))?;
        let route = match spec.metadata.get("route").map(|r| r.trim()) {
            None | Some("") => format!("/{}", spec.name),
            Some(r) if r.starts_with('/') => r.to_string(),
            Some(r) => format!("/{r}"),
        };
        if route.parse::<http::Uri>().is_err() {
            return Err(bad(format!("metadata route {route:?} is not a valid path")));
        }
        Ok(CronBinding {
            schedule,
            schedule_text: text.to_string(),
            route,
            directions: Directions::parse(&spec.metadata).map_err(bad)?,
            retry: RetryPolicy::parse(&spec.metadata).map_err(bad)?,
        })
    }
}

/// When a cron binding fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `@every`: at this interval from the start.
    Every(Duration),
    Fields(Fields),
}

/// A field schedule, as bit sets of the values each field allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    second: u64,
    minute: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    /// The day field was `*` or `?` (then only the other day field counts).
    dom_any: bool,
    dow_any: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// One field's text into (bits, was `*`/`?`), values within `min..=max`.
fn field(
    text: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
) -> Result<(u64, bool), String> {
    let value = |v: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
            // Month names count from 1, day names from 0.
            return Ok(i as u32 + min);
        }
        let n: u32 = v
            .parse()
            .map_err(|_| format!("{what} {v:?} is not a number"))?;
        if n < min || n > max {
            return Err(format!("{what} {n} is out of range {min}-{max}"));
        }
        Ok(n)
    };
    let (mut bits, mut any) = (0u64, false);
    for part in text.split(',') {
        if part.is_empty() {
            return Err(format!("{what} {text:?} has an empty list entry"));
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{what} step {s:?} is not a number > 0"))?;
                (r, Some(s))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            if step.is_none_or(|s| s == 1) {
                any = true;
            }
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `a/n` runs from a to the end.
            (v, if step.is_some() { max } else { v })
        };
        if lo > hi {
            return Err(format!("{what} range {range:?} runs backwards"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step.unwrap_or(1);
        }
    }
    Ok((bits, any))
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let mut text = text.trim();
        for prefix in ["CRON_TZ=", "TZ="] {
            if let Some(rest) = text.strip_prefix(prefix) {
                let (zone, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                if !matches!(zone, "UTC" | "Etc/UTC" | "GMT") {
                    return Err(format!(
                        "time zone {zone} is not supported: this runtime schedules in UTC; remove the {prefix} prefix or use UTC"
                    ));
                }
                text = rest.trim();
            }
        }
        if let Some(d) = text.strip_prefix("@every") {
            let d = d.trim();
            if d.is_empty() || d.bytes().all(|b| b.is_ascii_digit()) {
                return Err("@every needs a duration with a unit, e.g. @every 15s".into());
            }
            let d = nodeplane_pubsub::parse_duration(d)
                .ok_or_else(|| format!("{d:?} is not a duration (e.g. 15s, 1m30s)"))?;
            // Whole seconds, at least one (robfig/cron's rounding).
            let secs = d.as_secs().max(1);
            return Ok(Schedule::Every(Duration::from_secs(secs)));
        }
        let expanded = match text {
            "@yearly" | "@annually" => "0 0 0 1 1 *",
            "@monthly" => "0 0 0 1 * *",
            "@weekly" => "0 0 0 * * 0",
            "@daily" | "@midnight" => "0 0 0 * * *",
            "@hourly" => "0 0 * * * *",
            t if t.starts_with('@') => {
                return Err(format!(
                    "unknown descriptor {t}: use @every <duration>, @yearly, @monthly, @weekly, @daily or @hourly"
                ))
            }
            t => t,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        let parts: Vec<&str> = match parts.len() {
            5 => std::iter::once("0").chain(parts).collect(),
            6 => parts,
            n => {
                return Err(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), found {n}"
                ))
            }
        };
        let (second, _) = field(parts[0], "second", 0, 59, &[])?;
        let (minute, _) = field(parts[1], "minute", 0, 59, &[])?;
        let (hour, _) = field(parts[2], "hour", 0, 23, &[])?;
        let (dom, dom_any) = field(parts[3], "day of month", 1, 31, &[])?;
        let (month, _) = field(parts[4], "month", 1, 12, &MONTHS)?;
        let (dow, dow_any) = field(parts[5], "day of week", 0, 6, &DAYS)?;
        Ok(Schedule::Fields(Fields {
            second,
            minute,
            hour,
            dom,
            month,
            dow,
            dom_any,
            dow_any,
        }))
    }

    /// The first firing after `after` (for `@every`, counted from
    /// `after`); None when the fields never match (e.g. 30 February).
    pub fn next(&self, after: SystemTime) -> Option<SystemTime> {
        let secs = after.duration_since(UNIX_EPOCH).ok()?.as_secs();
        match self {
            Schedule::Every(d) => Some(UNIX_EPOCH + Duration::from_secs(secs) + *d),
            Schedule::Fields(f) => f
                .next(secs + 1)
                .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (the
/// civil-from-days algorithm of H. Hinnant, proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a date (the inverse of [`civil`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Fields {
    fn day_matches(&self, days: i64, dom: u32) -> bool {
        let dow = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday.
        let d = self.dom & (1 << dom) != 0;
        let w = self.dow & (1 << dow) != 0;
        if self.dom_any || self.dow_any {
            d && w
        } else {
            d || w
        }
    }

    /// The first matching second at or after `from` (unix seconds), within
    /// five years.
    fn next(&self, from: u64) -> Option<u64> {
        let mut t = i64::try_from(from).ok()?;
        let limit = t + 5 * 366 * 86_400;
        while t < limit {
            let days = t.div_euclid(86_400);
            let (y, m, d) = civil(days);
            if self.month & (1 << m) == 0 {
                // The first day of the next month.
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                t = days_from_civil(ny, nm, 1) * 86_400;
                continue;
            }
            if !self.day_matches(days, d) {
                t = (days + 1) * 86_400;
                continue;
            }
            let sod = t.rem_euclid(86_400);
            let (h, mi, s) = (sod / 3600, sod / 60 % 60, sod % 60);
            if self.hour & (1 << h) == 0 {
                t = days * 86_400 + (h + 1) * 3600;
                continue;
            }
            if self.minute & (1 << mi) == 0 {
                t = days * 86_400 + h * 3600 + (mi + 1) * 60;
                continue;
            }
            if self.second & (1 << s) == 0 {
                t += 1;
                continue;
            }
            return u64::try_from(t).ok();
        }
        None
    }
}

/// Go's `time.Time.String()` of a UTC time, as Dapr's cron binding sends
/// it in `readTimeUTC`: `2026-12-02 18:30:05.123456789 +0000 UTC`.
pub fn go_time_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, m, day) = civil(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let mut frac = String::new();
    if d.subsec_nanos() > 0 {
        frac = format!(".{:09}", d.subsec_nanos());
        while frac.ends_with('0') {
            frac.pop();
        }
    }
    format!(
        "{y:04}-{m:02}-{day:02} {:02}:{:02}:{:02}{frac} +0000 UTC",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64) -> SystemTime {
        let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    fn next(text: &str, from: SystemTime) -> SystemTime {
        Schedule::parse(text)
            .expect("parse")
            .next(from)
            .expect("a next firing")
    }

    #[test]
    fn calendar_arithmetic_round_trips() {
        for days in [-1, 0, 59, 365, 10_957, 19_000, 20_424, 2_932_896] {
            let (y, m, d) = civil(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(
            go_time_utc(at(2026, 12, 2, 18, 30, 5) + Duration::from_millis(120)),
            "2026-12-02 18:30:05.12 +0000 UTC"
        );
        assert_eq!(
            go_time_utc(at(2026, 1, 2, 3, 4, 5)),
            "2026-01-02 03:04:05 +0000 UTC"
        );
    }

    #[test]
    fn every_and_descriptors() {
        let t = at(2026, 12, 2, 18, 30, 5) + Duration::from_millis(700);
        assert_eq!(
            Schedule::parse("@every 15s").expect("every"),
            Schedule::Every(Duration::from_secs(15))
        );
        assert_eq!(
            Schedule::parse("@every 1h30m").expect("every"),
            Schedule::Every(Duration::from_secs(5400))
        );
        assert_eq!(
            Schedule::parse("@every 100ms").expect("every"),
            Schedule::Every(Duration::from_secs(1))
        );
        assert_eq!(next("@every 15s", t), at(2026, 12, 2, 18, 30, 20));
        assert_eq!(next("@hourly", t), at(2026, 12, 2, 19, 0, 0));
        assert_eq!(next("@daily", t), at(2026, 12, 3, 0, 0, 0));
        assert_eq!(next("@midnight", t), at(2026, 12, 3, 0, 0, 0));
        // 2026-12-02 is a Wednesday: the next Sunday is the 6th.
        assert_eq!(next("@weekly", t), at(2026, 12, 6, 0, 0, 0));
        assert_eq!(next("@monthly", t), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("@yearly", t), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("CRON_TZ=UTC @hourly", t), at(2026, 12, 2, 19, 0, 0));
        for bad in [
            "@every",
            "@every 5",
            "@every soon",
            "@often",
            "TZ=Europe/Paris @daily",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields_with_lists_ranges_and_steps() {
        let t = at(2026, 12, 2, 18, 30, 5);
        // Six fields: seconds first.
        assert_eq!(next("15 * * * * *", t), at(2026, 12, 2, 18, 30, 15));
        assert_eq!(next("*/10 * * * * *", t), at(2026, 12, 2, 18, 30, 10));
        assert_eq!(next("0 30 * * * *", t), at(2026, 12, 2, 19, 30, 0));
        // Five fields: seconds are 0.
        assert_eq!(next("*/15 * * * *", t), at(2026, 12, 2, 18, 45, 0));
        assert_eq!(next("0 9-17/4 * * MON-FRI", t), at(2026, 12, 3, 9, 0, 0));
        assert_eq!(next("0 0 1,15 * *", t), at(2026, 12, 15, 0, 0, 0));
        assert_eq!(next("0 0 * JAN,jul *", t), at(2027, 1, 1, 0, 0, 0));
        assert_eq!(next("0 12 29 2 *", t), at(2028, 2, 29, 12, 0, 0));
        assert_eq!(next("5/20 * * * *", t), at(2026, 12, 2, 18, 45, 0));
        assert_eq!(next("0 0 ? * SAT", t), at(2026, 12, 5, 0, 0, 0));
        // Both day fields restricted: either one.
        assert_eq!(next("0 0 31 * 5", t), at(2026, 12, 4, 0, 0, 0));
        // A second after a firing is the next one, never the same.
        let fired = at(2026, 12, 2, 18, 45, 0);
        assert_eq!(next("*/15 * * * *", fired), at(2026, 12, 2, 19, 0, 0));
        // Never.
        assert_eq!(Schedule::parse("0 0 30 2 *").expect("parse").next(t), None);
    }

    #[test]
    fn bad_fields_say_which() {
        for (text, says) in [
            ("* * * *", "expected 5 fields"),
            ("61 * * * *", "minute 61"),
            ("* 24 * * *", "hour 24"),
            ("* * 0 * *", "day of month 0"),
            ("* * * 13 *", "month 13"),
            ("* * * * 7", "day of week 7"),
            ("* * * * FUN", "day of week \"FUN\""),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "backwards"),
            ("1,,2 * * * *", "empty"),
        ] {
            let e = Schedule::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn components_are_checked() {
        let spec = |md: &[(&str, &str)]| ComponentSpec {
            name: "tick".into(),
            kind: "bindings.cron".into(),
            version: "v1".into(),
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let e = CronBinding::open(&spec(&[])).expect_err("no schedule");
        assert!(
            e.to_string().contains("metadata schedule is required"),
            "{e}"
        );
        let e = CronBinding::open(&spec(&[("schedule", "@sometimes")])).expect_err("bad");
        assert!(e.to_string().contains("@sometimes"), "{e}");
        let c = CronBinding::open(&spec(&[("schedule", "@every 1s")])).expect("open");
        assert_eq!(c.route, "/tick");
        let c = CronBinding::open(&spec(&[("schedule", "@every 1s"), ("route", "cron/x")]))
            .expect("open");
        assert_eq!(c.route, "/cron/x");
    }
}
