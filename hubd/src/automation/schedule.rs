//! Time in the rule language: durations, local times of day, weekday sets,
//! time windows, cron expressions, and when a schedule fires next.
//!
//! Calendar schedules (`at`, `cron`) name local wall-clock times, and wall
//! clocks jump twice a year. The rule, in one place:
//!
//! - A local time that does not exist (spring forward: 01:30 on the last
//!   Sunday of March in Europe/London) fires once, at the first instant
//!   after the gap (02:00 BST, the moment the clocks went forward). Several
//!   matching times inside one gap still fire only once.
//! - A local time that happens twice (fall back: 01:30 on the last Sunday of
//!   October in Europe/London) fires once, at its first occurrence (01:30 BST).
//! - `every` is a fixed number of seconds and ignores wall clocks: it fires at
//!   the whole multiples of its interval since 1970-01-01T00:00:00Z, so a
//!   10-minute rule fires at :00, :10, ... and a restart does not shift it;
//!   from one fire to the next is always exactly the interval.

use std::time::Duration;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};

/// The longest duration the rule language accepts anywhere.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// How far ahead a calendar schedule is searched. A cron expression that
/// only matches 29 February (with a dow of `*`) may wait 8 years, across
/// 2100, which is not a leap year; nothing valid waits longer.
const HORIZON_DAYS: u32 = 15 * 366;

/// Parses `500ms`, `30s`, `10m`, `1h30m`, `2d`: one or more whole numbers,
/// each with a unit, added up. Zero and durations over a year are refused.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| Err(format!("bad duration {s:?}: {why}"));
    if s.is_empty() {
        return bad("it is empty (write e.g. \"30s\", \"10m\", \"1h30m\")");
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return bad("expected a number (write e.g. \"30s\", \"10m\", \"1h30m\")");
        }
        let Ok(n) = rest[..digits].parse::<u64>() else {
            return bad("number too large");
        };
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let millis_per_unit: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return bad("a number needs a unit: ms, s, m, h or d"),
            other => return bad(&format!("unknown unit {other:?} (use ms, s, m, h or d)")),
        };
        rest = &rest[unit_len..];
        let Some(millis) = n.checked_mul(millis_per_unit) else {
            return bad("longer than a year");
        };
        total = total.saturating_add(Duration::from_millis(millis));
    }
    if total.is_zero() {
        return bad("must be more than zero");
    }
    if total > MAX_DURATION {
        return bad("longer than a year");
    }
    Ok(total)
}

/// Parses a local time of day, `HH:MM` or `HH:MM:SS`, 24-hour clock.
pub(crate) fn parse_time(s: &str) -> Result<Time, String> {
    let bad = || format!("bad time {s:?}: write HH:MM or HH:MM:SS, 00:00 to 23:59:59");
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let mut fields = [0i8; 3];
    for (field, part) in fields.iter_mut().zip(&parts) {
        if !(1..=2).contains(&part.len()) || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        *field = part.parse().map_err(|_| bad())?;
    }
    let [h, m, sec] = fields;
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad());
    }
    Time::new(h, m, sec, 0).map_err(|_| bad())
}

/// Names of the days, Monday first (jiff's Monday-zero offset is the index).
pub(crate) const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn day_index(name: &str) -> Option<u8> {
    let lower = name.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == lower)
        .and_then(|i| u8::try_from(i).ok())
}

/// A set of weekdays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weekdays(u8);

impl Weekdays {
    pub const ALL: Weekdays = Weekdays(0x7f);

    /// Parses day names (`mon` .. `sun`) and ranges (`mon-fri`; a range may
    /// wrap past Sunday: `fri-mon` is Friday to Monday).
    pub(crate) fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut bits = 0u8;
        for item in items {
            let unknown = || {
                format!(
                    "unknown day {item:?} (use mon, tue, wed, thu, fri, sat, sun or a range like mon-fri)"
                )
            };
            match item.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (
                        day_index(a).ok_or_else(unknown)?,
                        day_index(b).ok_or_else(unknown)?,
                    );
                    let mut d = a;
                    loop {
                        bits |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => bits |= 1 << day_index(item).ok_or_else(unknown)?,
            }
        }
        if bits == 0 {
            return Err("no days given".to_owned());
        }
        Ok(Weekdays(bits))
    }

    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.to_monday_zero_offset()) != 0
    }

    /// Bit 0 is Monday, bit 6 Sunday.
    pub(crate) fn bits(self) -> u8 {
        self.0
    }
}

/// A window of local time of day, `after` included, `before` excluded. When
/// `after` is later than `before` the window wraps past midnight (22:00 to
/// 06:00 is the night); a missing end is the start or end of the day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeWindow {
    pub after: Option<Time>,
    pub before: Option<Time>,
}

impl TimeWindow {
    pub fn contains(&self, t: Time) -> bool {
        match (self.after, self.before) {
            (Some(a), Some(b)) if a <= b => a <= t && t < b,
            (Some(a), Some(b)) => t >= a || t < b,
            (Some(a), None) => t >= a,
            (None, Some(b)) => t < b,
            (None, None) => true,
        }
    }
}

/// A parsed cron expression: `sec min hour dom month dow`, or the usual five
/// fields without seconds. Each field takes `*`, `N`, `A-B`, `*/S`, `A-B/S`,
/// `N/S` and comma lists; months take `jan`..`dec` and days of the week
/// `sun`..`sat` or 0..7 (0 and 7 are Sunday). As in Vixie cron, when both
/// day fields are restricted a day matching either fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    source: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// Bits 1..=31.
    days_of_month: u64,
    /// Bits 1..=12.
    months: u64,
    /// Monday-zero bits, as [`Weekdays`].
    weekdays: u64,
    /// Whether the day-of-month field was `*` (then the days are ANDed).
    dom_star: bool,
    /// Whether the day-of-week field was `*`.
    dow_star: bool,
}

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const CRON_DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses one cron field into a bit set over `min..=max`. `names` map to
/// `name_base + index`.
fn cron_field(
    field: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        let n = match names.iter().position(|n| *n == lower) {
            Some(i) => u32::try_from(i).map_err(|e| e.to_string())? + name_base,
            None => s
                .parse::<u32>()
                .map_err(|_| format!("{what} {s:?} is not a number"))?,
        };
        if n < min || n > max {
            return Err(format!("{what} {n} is outside {min}-{max}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step = s
                    .parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{what} step {s:?} is not a positive number"))?;
                (r, Some(step))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("{what} range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let a = value(range)?;
            // `N/S` means "from N in steps of S"; a bare `N` is just N.
            (a, if step.is_some() { max } else { a })
        };
        let mut n = lo;
        while n <= hi {
            bits |= 1 << n;
            let Some(next) = n.checked_add(step.unwrap_or(1)) else {
                break;
            };
            n = next;
        }
    }
    Ok(bits)
}

/// Days in each month in a leap year: the most a month can have.
const MAX_MONTH_DAYS: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl Cron {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let wrap = |e: String| format!("bad cron {s:?}: {e}");
        let fields: Vec<&str> = s.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(wrap(format!(
                    "{n} fields; write 6 (sec min hour day month weekday) or 5 (min hour day month weekday)"
                )));
            }
        };
        let [min, hour, dom, month, dow] = rest else {
            return Err(wrap("wrong number of fields".to_owned()));
        };
        let dow_cron = cron_field(dow, "weekday", 0, 7, &CRON_DAY_NAMES, 0).map_err(wrap)?;
        // Cron counts Sunday as 0 (and 7); store Monday-zero like Weekdays.
        let mut weekdays = 0u64;
        for c in 0..8u32 {
            if dow_cron & (1 << c) != 0 {
                weekdays |= 1 << ((c + 6) % 7);
            }
        }
        let cron = Cron {
            source: s.to_owned(),
            seconds: cron_field(sec, "second", 0, 59, &[], 0).map_err(wrap)?,
            minutes: cron_field(min, "minute", 0, 59, &[], 0).map_err(wrap)?,
            hours: cron_field(hour, "hour", 0, 23, &[], 0).map_err(wrap)?,
            days_of_month: cron_field(dom, "day", 1, 31, &[], 0).map_err(wrap)?,
            months: cron_field(month, "month", 1, 12, &MONTH_NAMES, 1).map_err(wrap)?,
            weekdays,
            dom_star: dom.starts_with('*'),
            dow_star: dow.starts_with('*'),
        };
        // With the weekday field `*`, only the day of month picks days: make
        // sure some chosen month has some chosen day (30 feb never comes).
        if cron.dow_star {
            let possible = (1..=12u32).zip(MAX_MONTH_DAYS).any(|(month, days)| {
                let days_in_month = (1u64 << (days + 1)) - 2;
                cron.months & (1 << month) != 0 && cron.days_of_month & days_in_month != 0
            });
            if !possible {
                return Err(wrap(
                    "it never fires: no chosen month has the chosen day".to_owned(),
                ));
            }
        }
        Ok(cron)
    }

    /// An `at` schedule as the calendar it is: one time on some weekdays.
    fn at(time: Time, days: Weekdays) -> Self {
        let bit = |n: i8| 1u64 << u32::try_from(n).unwrap_or(0);
        Cron {
            source: String::new(),
            seconds: bit(time.second()),
            minutes: bit(time.minute()),
            hours: bit(time.hour()),
            days_of_month: u64::MAX,
            months: u64::MAX,
            weekdays: u64::from(days.0),
            dom_star: true,
            dow_star: days == Weekdays::ALL,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn day_matches(&self, date: Date) -> bool {
        let has = |bits: u64, n: i8| u32::try_from(n).is_ok_and(|n| bits & (1 << n) != 0);
        if !has(self.months, date.month()) {
            return false;
        }
        let dom = has(self.days_of_month, date.day());
        let dow = has(self.weekdays, date.weekday().to_monday_zero_offset());
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first matching time of day at or after `from`, if any today.
    fn first_time(&self, from: Time) -> Option<Time> {
        let (h0, m0, s0) = (
            u32::try_from(from.hour()).ok()?,
            u32::try_from(from.minute()).ok()?,
            u32::try_from(from.second()).ok()?,
        );
        let mut h = next_bit(self.hours, h0)?;
        loop {
            let mut m = next_bit(self.minutes, if h == h0 { m0 } else { 0 });
            while let Some(min) = m {
                let s_from = if h == h0 && min == m0 { s0 } else { 0 };
                if let Some(s) = next_bit(self.seconds, s_from) {
                    let n = |x: u32| i8::try_from(x).ok();
                    return Time::new(n(h)?, n(min)?, n(s)?, 0).ok();
                }
                m = next_bit(self.minutes, min + 1);
            }
            h = next_bit(self.hours, h + 1)?;
        }
    }

    /// The first matching local date and time at or after `from`.
    fn next_civil(&self, from: DateTime) -> Option<DateTime> {
        let mut date = from.date();
        let mut start = from.time();
        for _ in 0..HORIZON_DAYS {
            if self.day_matches(date)
                && let Some(t) = self.first_time(start)
            {
                return Some(date.to_datetime(t));
            }
            date = date.tomorrow().ok()?;
            start = Time::midnight();
        }
        None
    }
}

/// The lowest set bit at or above `from`.
fn next_bit(bits: u64, from: u32) -> Option<u32> {
    let rest = bits.checked_shr(from)?;
    (rest != 0).then(|| from + rest.trailing_zeros())
}

/// When a rule runs without an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// `every = "10m"`: a fixed interval, aligned to the Unix epoch.
    Every(Duration),
    /// `at = "07:30"`, optionally `days = [...]`: local time.
    At { time: Time, days: Weekdays },
    /// `cron = "..."`: local time.
    Cron(Cron),
}

/// The first instant strictly after `after` at which `schedule` fires, in
/// the zone `tz`; `None` if it never fires again (within 15 years, or
/// before the end of time jiff can represent).
pub fn next_fire(schedule: &Schedule, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
    match schedule {
        Schedule::Every(interval) => {
            let step = i128::try_from(interval.as_nanos())
                .ok()
                .filter(|n| *n > 0)?;
            let k = after.as_nanosecond().div_euclid(step).checked_add(1)?;
            Timestamp::from_nanosecond(k.checked_mul(step)?).ok()
        }
        Schedule::At { time, days } => calendar_next(&Cron::at(*time, *days), after, tz),
        Schedule::Cron(cron) => calendar_next(cron, after, tz),
    }
}

/// Whether `schedule` fires exactly at `at`: the test a `Tick` event makes.
pub fn fires_at(schedule: &Schedule, at: Timestamp, tz: &TimeZone) -> bool {
    at.checked_sub(SignedDuration::from_nanos(1))
        .ok()
        .and_then(|before| next_fire(schedule, before, tz))
        == Some(at)
}

fn calendar_next(cron: &Cron, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
    let one_second = SignedDuration::from_secs(1);
    // Candidates are whole seconds; start at the second `after` falls in.
    let mut from = tz
        .to_datetime(after)
        .with()
        .subsec_nanosecond(0)
        .build()
        .ok()?;
    // Each turn either returns or moves `from` forward past a candidate; only
    // candidates inside a fold or a gap can take more than one turn, so the
    // bound is never reached by a real schedule.
    for _ in 0..10_000 {
        let civil = cron.next_civil(from)?;
        let (fire, skip_to) = match tz.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => (offset.to_timestamp(civil).ok()?, None),
            AmbiguousOffset::Gap { after: later, .. } => {
                // The civil time does not exist: fire when the clocks jump,
                // which is the first transition after this time read with the
                // later offset (an instant still before the jump).
                let early = later.to_timestamp(civil).ok()?;
                let jump = tz.following(early).next()?.timestamp();
                // Every other candidate in this gap maps to the same instant.
                (jump, Some(tz.to_datetime(jump)))
            }
            AmbiguousOffset::Fold { before, .. } => {
                // Twice on the clock: fire at the first occurrence only.
                let first = before.to_timestamp(civil).ok()?;
                let fall_back = tz.following(first).next()?.timestamp();
                // If `after` is already past the fall-back, every candidate
                // in the fold maps to a first occurrence before it: skip to
                // the end of the fold, the civil time the clock reaches when
                // it fell back, read with the earlier offset.
                let skip = (after >= fall_back).then(|| before.to_datetime(fall_back));
                (first, skip)
            }
        };
        if fire > after {
            return Some(fire);
        }
        let next = civil.checked_add(one_second).ok()?;
        from = skip_to.map_or(next, |s| s.max(next));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).unwrap()
    }

    fn cron(s: &str) -> Schedule {
        Schedule::Cron(Cron::parse(s).unwrap())
    }

    fn at(time: &str, days: &[&str]) -> Schedule {
        Schedule::At {
            time: parse_time(time).unwrap(),
            days: if days.is_empty() {
                Weekdays::ALL
            } else {
                Weekdays::parse(days.iter().copied()).unwrap()
            },
        }
    }

    #[test]
    fn durations() {
        for (s, want) in [
            ("30s", Some(30_000)),
            ("10m", Some(600_000)),
            ("1h30m", Some(5_400_000)),
            ("2d", Some(172_800_000)),
            ("500ms", Some(500)),
            ("", None),
            ("10", None),
            ("10x", None),
            ("-5s", None),
            ("0s", None),
            ("5 s", None),
            ("400d", None),
            ("99999999999999999999s", None),
            ("18446744073709551615d", None),
        ] {
            let got = parse_duration(s).ok().map(|d| d.as_millis());
            assert_eq!(got, want, "{s:?}");
        }
    }

    #[test]
    fn times_of_day() {
        assert_eq!(parse_time("07:30").unwrap(), Time::constant(7, 30, 0, 0));
        assert_eq!(parse_time("7:05:09").unwrap(), Time::constant(7, 5, 9, 0));
        for bad in [
            "25:00", "24:00", "12:60", "12", "12:00:60", "a:b", "1:2:3:4", "-1:00", ":30",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn weekday_sets_and_wrapping_ranges() {
        let w = Weekdays::parse(["fri-mon"]).unwrap();
        for (day, want) in [
            (Weekday::Friday, true),
            (Weekday::Sunday, true),
            (Weekday::Monday, true),
            (Weekday::Tuesday, false),
            (Weekday::Thursday, false),
        ] {
            assert_eq!(w.contains(day), want, "{day:?}");
        }
        assert!(
            Weekdays::parse(["Sat", "sun"])
                .unwrap()
                .contains(Weekday::Saturday)
        );
        assert!(Weekdays::parse(["funday"]).is_err());
        assert!(Weekdays::parse([]).is_err());
    }

    #[test]
    fn time_windows_wrap_midnight() {
        let t = |s| parse_time(s).unwrap();
        let day = TimeWindow {
            after: Some(t("07:00")),
            before: Some(t("22:00")),
        };
        let night = TimeWindow {
            after: Some(t("22:00")),
            before: Some(t("06:00")),
        };
        for (now, in_day, in_night) in [
            ("06:59:59", false, false),
            ("07:00", true, false),
            ("21:59:59", true, false),
            ("22:00", false, true),
            ("23:59:59", false, true),
            ("00:00", false, true),
            ("05:59:59", false, true),
            ("06:00", false, false),
        ] {
            assert_eq!(day.contains(t(now)), in_day, "day {now}");
            assert_eq!(night.contains(t(now)), in_night, "night {now}");
        }
    }

    #[test]
    fn cron_syntax() {
        for good in [
            "0 30 7 * * mon-fri",
            "30 7 * * 1-5",
            "*/15 * * * * *",
            "0 0 12 1,15 jan-jun,dec sun",
            "0 0/20 * * * 7",
            "0 0 0 29 feb *",
        ] {
            assert!(Cron::parse(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "",
            "* * * *",
            "* * * * * * *",
            "60 * * * * *",
            "* 60 * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "* * * * funday",
            "*/0 * * * *",
            "5-1 * * * *",
            "0 0 30 feb *",
            "0 0 31 apr,jun *",
            "a b c d e",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// (schedule, zone, after, expected next fire), all in UTC instants.
    #[test]
    fn next_fire_table() {
        let london = "Europe/London";
        let new_york = "America/New_York";
        #[rustfmt::skip]
        let cases: Vec<(&str, Schedule, &str, &str, Option<&str>)> = vec![
            // every: aligned to the epoch, strictly after, a fixed interval.
            ("every 10m", Schedule::Every(Duration::from_secs(600)), london, "2025-06-01T10:03:00Z", Some("2025-06-01T10:10:00Z")),
            ("every from a fire", Schedule::Every(Duration::from_secs(600)), london, "2025-06-01T10:10:00Z", Some("2025-06-01T10:20:00Z")),
            ("every across spring forward", Schedule::Every(Duration::from_secs(3600)), london, "2025-03-30T00:30:00Z", Some("2025-03-30T01:00:00Z")),
            ("every across fall back", Schedule::Every(Duration::from_secs(3600)), london, "2025-10-26T00:59:59Z", Some("2025-10-26T01:00:00Z")),
            // at: local time, BST is UTC+1 in summer.
            ("at later today", at("07:30", &[]), london, "2025-06-02T05:00:00Z", Some("2025-06-02T06:30:00Z")),
            ("at tomorrow", at("07:30", &[]), london, "2025-06-02T06:30:00Z", Some("2025-06-03T06:30:00Z")),
            ("at in winter", at("07:30", &[]), london, "2025-01-10T08:00:00Z", Some("2025-01-11T07:30:00Z")),
            // 2025-06-07 is a Saturday: [mon] crosses the week boundary.
            ("at mon from sat", at("07:30", &["mon"]), london, "2025-06-07T22:00:00Z", Some("2025-06-09T06:30:00Z")),
            ("at sun,mon from sun after", at("07:30", &["sun", "mon"]), london, "2025-06-08T07:00:00Z", Some("2025-06-09T06:30:00Z")),
            ("at fri-mon from tue", at("07:30", &["fri-mon"]), london, "2025-06-03T12:00:00Z", Some("2025-06-06T06:30:00Z")),
            // Spring forward in London: 2025-03-30 01:00 GMT -> 02:00 BST.
            ("at in the gap", at("01:30", &[]), london, "2025-03-29T12:00:00Z", Some("2025-03-30T01:00:00Z")),
            ("at in the gap, next day", at("01:30", &[]), london, "2025-03-30T01:00:00Z", Some("2025-03-31T00:30:00Z")),
            ("at just before the gap", at("00:59", &[]), london, "2025-03-29T12:00:00Z", Some("2025-03-30T00:59:00Z")),
            ("at just after the gap", at("02:00", &[]), london, "2025-03-29T12:00:00Z", Some("2025-03-30T01:00:00Z")),
            // Fall back in London: 2025-10-26 02:00 BST -> 01:00 GMT.
            ("at in the fold: first", at("01:30", &[]), london, "2025-10-25T12:00:00Z", Some("2025-10-26T00:30:00Z")),
            ("at in the fold: not twice", at("01:30", &[]), london, "2025-10-26T00:30:00Z", Some("2025-10-27T01:30:00Z")),
            ("at in the fold from between", at("01:30", &[]), london, "2025-10-26T01:10:00Z", Some("2025-10-27T01:30:00Z")),
            // New York: 2025-03-09 02:00 EST -> 03:00 EDT; 2025-11-02 02:00 EDT -> 01:00 EST.
            ("ny gap", at("02:30", &[]), new_york, "2025-03-08T12:00:00Z", Some("2025-03-09T07:00:00Z")),
            ("ny after gap", at("02:30", &[]), new_york, "2025-03-09T07:00:00Z", Some("2025-03-10T06:30:00Z")),
            ("ny fold first", at("01:30", &[]), new_york, "2025-11-01T12:00:00Z", Some("2025-11-02T05:30:00Z")),
            ("ny fold once", at("01:30", &[]), new_york, "2025-11-02T05:30:00Z", Some("2025-11-03T06:30:00Z")),
            // cron, with seconds and without.
            ("cron weekdays", cron("0 30 7 * * mon-fri"), london, "2025-06-06T07:00:00Z", Some("2025-06-09T06:30:00Z")),
            ("cron 5 fields", cron("30 7 * * 1-5"), london, "2025-06-06T05:00:00Z", Some("2025-06-06T06:30:00Z")),
            ("cron every 15 s", cron("*/15 * * * * *"), london, "2025-06-06T05:00:07.5Z", Some("2025-06-06T05:00:15Z")),
            ("cron dom or dow", cron("0 0 12 13 * fri"), london, "2025-06-06T12:00:00Z", Some("2025-06-13T11:00:00Z")),
            ("cron dom or dow 2", cron("0 0 12 10 * fri"), london, "2025-06-07T00:00:00Z", Some("2025-06-10T11:00:00Z")),
            ("cron leap day", cron("0 0 0 29 feb *"), london, "2025-01-01T00:00:00Z", Some("2028-02-29T00:00:00Z")),
            ("cron leap day across 2100", cron("0 0 0 29 feb *"), london, "2096-03-01T00:00:00Z", Some("2104-02-29T00:00:00Z")),
            // Every 15 minutes through the London gap: once at 02:00 BST, then 02:15.
            ("cron in gap", cron("0 */15 * * * *"), london, "2025-03-30T00:50:00Z", Some("2025-03-30T01:00:00Z")),
            ("cron in gap once", cron("0 */15 * * * *"), london, "2025-03-30T01:00:00Z", Some("2025-03-30T01:15:00Z")),
            // ... and through the fold: 01:00..01:45 BST once, not again in GMT.
            ("cron in fold", cron("0 */15 1 * * *"), london, "2025-10-26T00:40:00Z", Some("2025-10-26T00:45:00Z")),
            ("cron fold not again", cron("0 */15 1 * * *"), london, "2025-10-26T00:45:00Z", Some("2025-10-27T01:00:00Z")),
            ("cron fold every second", cron("* * 1 * * *"), london, "2025-10-26T00:59:58Z", Some("2025-10-26T00:59:59Z")),
            ("cron fold every second end", cron("* * 1 * * *"), london, "2025-10-26T00:59:59Z", Some("2025-10-27T01:00:00Z")),
            ("ny cron gap", cron("0 */20 2 * * *"), new_york, "2025-03-09T06:59:00Z", Some("2025-03-09T07:00:00Z")),
            ("ny cron gap once", cron("0 */20 2 * * *"), new_york, "2025-03-09T07:00:00Z", Some("2025-03-10T06:00:00Z")),
            ("utc zone", at("07:30", &[]), "UTC", "2025-03-30T07:29:59Z", Some("2025-03-30T07:30:00Z")),
        ];
        for (what, schedule, zone, after, want) in cases {
            let got = next_fire(&schedule, ts(after), &tz(zone));
            assert_eq!(got, want.map(ts), "{what}");
            if let Some(fire) = got {
                assert!(fires_at(&schedule, fire, &tz(zone)), "{what}: fires_at");
                let later = fire.checked_add(SignedDuration::from_millis(1)).unwrap();
                assert!(
                    !fires_at(&schedule, later, &tz(zone)),
                    "{what}: not 1 ms later"
                );
            }
        }
    }

    #[test]
    fn a_fold_fires_once_across_the_whole_night() {
        // Walk every fire of an every-minute cron through the London fall
        // back night and check no local minute fires twice.
        let zone = tz("Europe/London");
        let schedule = cron("0 * * * * *");
        let mut t = ts("2025-10-25T23:00:00Z");
        let mut seen = std::collections::HashSet::new();
        let mut fires = 0;
        while t < ts("2025-10-26T03:00:00Z") {
            t = next_fire(&schedule, t, &zone).unwrap();
            assert!(
                seen.insert(zone.to_datetime(t)),
                "{t} fired twice on the clock"
            );
            fires += 1;
        }
        // Four hours of instants, but the repeated local hour fires once:
        // local 00:01 to 03:00 is three hours of minutes.
        assert_eq!(fires, 3 * 60);
    }

    #[test]
    fn end_of_time_is_none_not_a_panic() {
        let zone = tz("Europe/London");
        assert_eq!(
            next_fire(
                &Schedule::Every(Duration::from_secs(60)),
                Timestamp::MAX,
                &zone
            ),
            None
        );
        assert_eq!(next_fire(&at("07:30", &[]), Timestamp::MAX, &zone), None);
        assert!(next_fire(&at("07:30", &[]), Timestamp::MIN, &zone).is_some());
    }
}
