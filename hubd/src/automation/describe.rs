//! One-line descriptions of triggers, actions and events, for `hubctl rules
//! list`, the run history and dry runs. Close to the rule language, so a
//! householder recognises what they wrote.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::schedule::{DAY_NAMES, Schedule, Weekdays};
use super::value::Test;
use super::{Action, Event, Trigger};

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Test::Eq(v) => write!(f, "== {v}"),
            Test::Ne(v) => write!(f, "!= {v}"),
            Test::Lt(n) => write!(f, "< {n}"),
            Test::Le(n) => write!(f, "<= {n}"),
            Test::Gt(n) => write!(f, "> {n}"),
            Test::Ge(n) => write!(f, ">= {n}"),
            Test::Between(lo, hi) => write!(f, "between {lo} and {hi}"),
            Test::Changed => f.write_str("changed"),
        }
    }
}

impl fmt::Display for Weekdays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = DAY_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.bits() & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect();
        f.write_str(&days.join(","))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {}", duration(*d)),
            Schedule::At { time, days } if *days == Weekdays::ALL => {
                write!(f, "at {}", time.strftime("%H:%M:%S"))
            }
            Schedule::At { time, days } => {
                write!(f, "at {} on {days}", time.strftime("%H:%M:%S"))
            }
            Schedule::Cron(cron) => write!(f, "cron {:?}", cron.as_str()),
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::State {
                device,
                pointer,
                test,
            } => write!(
                f,
                "state of {device}{} {test}",
                pointer_text(pointer.as_str())
            ),
            Trigger::Event {
                device,
                name,
                pointer,
                test,
            } => {
                match name {
                    Some(name) => write!(f, "event {name} of {device}")?,
                    None => write!(f, "any event of {device}")?,
                }
                if let Some(test) = test {
                    write!(f, " with{} {test}", pointer_text(pointer.as_str()))?;
                }
                Ok(())
            }
            Trigger::Online(d) => write!(f, "{d} comes online"),
            Trigger::Offline(d) => write!(f, "{d} goes offline"),
            Trigger::Start => f.write_str("hub start"),
            Trigger::Schedule(s) => s.fmt(f),
        }
    }
}

fn pointer_text(p: &str) -> String {
    if p.is_empty() {
        String::new()
    } else {
        format!(" {p}")
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Command { payload, .. } => {
                let topic = self.topic().unwrap_or_default();
                write!(f, "command {topic} {payload}")
            }
            Action::Delay(d) => write!(f, "delay {}", duration(*d)),
            Action::SetVar { name, value } => write!(f, "set {name} = {value}"),
            Action::ClearVar { name } => write!(f, "clear {name}"),
            Action::Log(text) => write!(f, "log: {text}"),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::State { device, value, .. } => write!(f, "d/{device}/state {}", short(value)),
            Event::Event {
                device,
                name,
                value,
            } => write!(f, "d/{device}/event/{name} {}", short(value)),
            Event::Online(d) => write!(f, "{d} online"),
            Event::Offline(d) => write!(f, "{d} offline"),
            Event::Start => f.write_str("hub start"),
            Event::Tick(at) => write!(f, "time {at}"),
        }
    }
}

/// A JSON value cut to a readable length for one line.
fn short(value: &Value) -> String {
    const MAX: usize = 120;
    let text = value.to_string();
    if text.chars().count() <= MAX {
        return text;
    }
    let cut: String = text.chars().take(MAX).collect();
    format!("{cut}…")
}

/// `90s` as `1m30s`, `1500ms` as `1.5s`: the rule language's own units.
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return if ms < 1000 {
            format!("{ms}ms")
        } else {
            format!("{}s", d.as_secs_f64())
        };
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    if out.is_empty() { "0s".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::automation::parse_rules;

    fn trigger(t: &str) -> String {
        let text =
            format!("[[rule]]\nname = \"r\"\ntrigger = {t}\nactions = [{{ log = \"x\" }}]\n");
        parse_rules(&text, "t.toml", &|_| true).unwrap()[0]
            .trigger
            .to_string()
    }

    #[test]
    fn triggers_read_like_the_rule_language() {
        assert_eq!(
            trigger(r#"{ state = "s-1", pointer = "/t", op = ">", value = 25 }"#),
            "state of s-1 /t > 25"
        );
        assert_eq!(
            trigger(r#"{ state = "s-1", pointer = "/t", op = "between", value = [1, 2.5] }"#),
            "state of s-1 /t between 1 and 2.5"
        );
        assert_eq!(
            trigger(r#"{ event = "door-1", name = "lock" }"#),
            "event lock of door-1"
        );
        assert_eq!(
            trigger(r#"{ event = "door-1", pointer = "/by", op = "==", value = "keypad" }"#),
            "any event of door-1 with /by == \"keypad\""
        );
        assert_eq!(trigger(r#"{ online = "s-1" }"#), "s-1 comes online");
        assert_eq!(trigger(r#"{ start = true }"#), "hub start");
        assert_eq!(trigger(r#"{ every = "90m" }"#), "every 1h30m");
        assert_eq!(
            trigger(r#"{ at = "07:30", days = ["mon-fri"] }"#),
            "at 07:30:00 on mon,tue,wed,thu,fri"
        );
        assert_eq!(trigger(r#"{ at = "07:30" }"#), "at 07:30:00");
        assert_eq!(
            trigger(r#"{ cron = "0 30 7 * * mon-fri" }"#),
            "cron \"0 30 7 * * mon-fri\""
        );
    }

    #[test]
    fn durations_use_the_rule_units() {
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration(Duration::from_secs(3600 + 30)), "1h30s");
        assert_eq!(duration(Duration::from_secs(2 * 86_400)), "2d");
    }
}
