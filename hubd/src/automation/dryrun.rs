//! Dry runs (`hubctl rules test FILE --event ...`): which rules would fire
//! for a sequence of made-up events, and what they would do, against the
//! hub's current device states and variables. Nothing is sent or stored.
//!
//! Event syntax, one per `--event`:
//!
//! | written | event |
//! |---|---|
//! | `d/ID/state=JSON` | device ID publishes its state |
//! | `d/ID/event/NAME=JSON` | device ID publishes an event (`=JSON` may be left out: `{}`) |
//! | `online:ID`, `offline:ID` | device ID comes online, goes offline |
//! | `start` | the hub starts |
//! | `time:WHEN` | the clock reaches WHEN: RFC 3339 (`2026-11-23T07:30:00Z`) or local (`2026-11-23T07:30`) |
//!
//! A payload that is not JSON is taken as a string, as the runner does with
//! a device's publish. Events are applied in order: a state event becomes the
//! device's state for the next one, and `set_var`/`clear_var` actions of a
//! rule that would fire change the variables the next events see. Cooldowns
//! and `max_runs_per_minute` are not simulated.

use std::collections::HashSet;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::Value;

use super::{Action, Error, Event, Rule, Snapshot, Verdict, check};
use crate::model::DeviceId;

/// What one rule would do for one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It would run these actions (described as the history shows them).
    Fires(Vec<String>),
    /// It is triggered, but condition `index` (1-based) does not hold.
    ConditionFails(usize),
    /// It is disabled; enabled, it would run these actions.
    Disabled(Vec<String>),
}

/// One rule's part in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleOutcome {
    pub rule: String,
    pub outcome: Outcome,
}

/// One event and the rules it triggers (rules it does not trigger are left
/// out).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub event: String,
    pub rules: Vec<RuleOutcome>,
}

/// Parses one `--event` (see the module doc). `previous` gives the device's
/// current state for a state event.
pub fn parse_event(text: &str, ctx: &Snapshot, tz: &TimeZone) -> Result<Event, Error> {
    let bad = |reason: String| Error::BadEvent {
        event: text.to_owned(),
        reason,
    };
    let device = |id: &str| DeviceId::parse(id).map_err(|e| bad(e.to_string()));
    if text == "start" {
        return Ok(Event::Start);
    }
    if let Some(id) = text.strip_prefix("online:") {
        return Ok(Event::Online(device(id)?));
    }
    if let Some(id) = text.strip_prefix("offline:") {
        return Ok(Event::Offline(device(id)?));
    }
    if let Some(when) = text.strip_prefix("time:") {
        return parse_time(when, tz).map(Event::Tick).map_err(bad);
    }
    if text.starts_with("d/") {
        let (topic, payload) = text.split_once('=').unwrap_or((text, "{}"));
        let rest = &topic[2..];
        let (id, kind) = rest
            .split_once('/')
            .ok_or_else(|| bad("write d/ID/state=JSON or d/ID/event/NAME=JSON".into()))?;
        let id = device(id)?;
        let is_event = kind
            .strip_prefix("event/")
            .is_some_and(|n| !n.is_empty() && !n.contains(['+', '#']));
        if kind != "state" && !is_event {
            return Err(bad(format!(
                "topic {topic:?} is neither d/ID/state nor d/ID/event/NAME"
            )));
        }
        let previous = ctx.states.get(&id).cloned();
        return Event::from_publish(topic, payload.as_bytes(), previous)
            .ok_or_else(|| bad(format!("topic {topic:?} is not a device's state or event")));
    }
    Err(bad(
        "expected d/ID/state=JSON, d/ID/event/NAME=JSON, online:ID, offline:ID, start or time:WHEN"
            .into(),
    ))
}

/// `2026-11-23T07:30:00Z` (any RFC 3339 instant) or a local date and time
/// in `tz` (`2026-11-23T07:30`; a time the clocks skip or repeat is taken
/// as jiff's "compatible" choice: after a gap, the first of a fold).
pub fn parse_time(text: &str, tz: &TimeZone) -> Result<Timestamp, String> {
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(at);
    }
    let local: jiff::civil::DateTime = text.parse().map_err(|e| {
        format!("bad time {text:?}: write 2026-11-23T07:30 (local) or 2026-11-23T07:30:00Z ({e})")
    })?;
    tz.to_ambiguous_timestamp(local)
        .compatible()
        .map_err(|e| format!("bad time {text:?}: {e}"))
}

/// Runs `events` through `rules` from `start`, at `at`. `isolated` marks the
/// commands that would not be sent.
pub fn run(
    rules: &[Rule],
    events: Vec<Event>,
    at: Timestamp,
    tz: &TimeZone,
    mut ctx: Snapshot,
    isolated: &HashSet<DeviceId>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for event in events {
        // The previous state is the one the events so far left behind.
        let event = match event {
            Event::State { device, value, .. } => {
                let previous = ctx.states.insert(device.clone(), value.clone());
                Event::State {
                    device,
                    value,
                    previous,
                }
            }
            other => other,
        };
        let now = match &event {
            Event::Tick(t) => *t,
            _ => at,
        };
        let mut step = Step {
            event: event.to_string(),
            rules: Vec::new(),
        };
        for rule in rules {
            let mut enabled = rule.clone();
            enabled.enabled = true;
            let outcome = match check(&enabled, &event, now, tz, &ctx) {
                Verdict::NotTriggered | Verdict::Disabled => continue,
                Verdict::ConditionFailed { index } => Outcome::ConditionFails(index + 1),
                Verdict::Fire(actions) => {
                    let described = actions.iter().map(|a| describe(a, isolated)).collect();
                    if !rule.enabled {
                        Outcome::Disabled(described)
                    } else {
                        apply_vars(&mut ctx, &actions);
                        Outcome::Fires(described)
                    }
                }
            };
            step.rules.push(RuleOutcome {
                rule: rule.name.to_string(),
                outcome,
            });
        }
        steps.push(step);
    }
    steps
}

fn apply_vars(ctx: &mut Snapshot, actions: &[Action]) {
    for action in actions {
        match action {
            Action::SetVar { name, value } => {
                ctx.vars.insert(name.clone(), value.clone());
            }
            Action::ClearVar { name } => {
                ctx.vars.remove(name);
            }
            _ => {}
        }
    }
}

/// An action as the history shows it, with a note when a command would not
/// be sent.
pub(crate) fn describe(action: &Action, isolated: &HashSet<DeviceId>) -> String {
    match action {
        Action::Command { device, .. } if isolated.contains(device) => {
            format!("{action} (not sent: {device} is isolated)")
        }
        _ => action.to_string(),
    }
}

/// A device's publish as the runner reads it: JSON, else a string.
pub(crate) fn payload_value(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::automation::parse_rules;
    use serde_json::json;

    fn tz() -> TimeZone {
        TimeZone::get("Europe/London").unwrap()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    const RULES: &str = r#"
[[rule]]
name = "fan"
trigger = { state = "sensor-1", pointer = "/t", op = ">", value = 25 }
conditions = [{ var = "mode", op = "!=", value = "away" }]
actions = [{ command = "fan-1", name = "set", payload = { on = true, t = "{{trigger.value}}" } }]

[[rule]]
name = "away"
trigger = { event = "door-1", name = "lock" }
actions = [{ set_var = "mode", value = "away" }, { delay = "5s" }]

[[rule]]
name = "off"
enabled = false
trigger = { offline = "fan-1" }
actions = [{ log = "fan gone" }]

[[rule]]
name = "morning"
trigger = { at = "07:30" }
actions = [{ log = "morning" }]
"#;

    fn rules() -> Vec<Rule> {
        parse_rules(RULES, "r.toml", &|_| true).unwrap()
    }

    fn events(texts: &[&str], ctx: &Snapshot) -> Vec<Event> {
        texts
            .iter()
            .map(|t| parse_event(t, ctx, &tz()).unwrap())
            .collect()
    }

    #[test]
    fn event_syntax() {
        let mut ctx = Snapshot::default();
        ctx.states.insert(id("s-1"), json!({"t": 1}));
        assert_eq!(
            parse_event(r#"d/s-1/state={"t": 30}"#, &ctx, &tz()).unwrap(),
            Event::State {
                device: id("s-1"),
                value: json!({"t": 30}),
                previous: Some(json!({"t": 1})),
            }
        );
        assert_eq!(
            parse_event("d/door-1/event/lock", &ctx, &tz()).unwrap(),
            Event::Event {
                device: id("door-1"),
                name: "lock".into(),
                value: json!({}),
            }
        );
        assert_eq!(
            parse_event("d/s-1/state=warm", &ctx, &tz()).unwrap(),
            Event::State {
                device: id("s-1"),
                value: json!("warm"),
                previous: Some(json!({"t": 1})),
            }
        );
        assert_eq!(
            parse_event("online:s-1", &ctx, &tz()).unwrap(),
            Event::Online(id("s-1"))
        );
        assert_eq!(parse_event("start", &ctx, &tz()).unwrap(), Event::Start);
        // Local time in the hub's zone: 07:30 GMT in November.
        assert_eq!(
            parse_event("time:2026-11-23T07:30", &ctx, &tz()).unwrap(),
            Event::Tick("2026-11-23T07:30:00Z".parse().unwrap())
        );
        assert_eq!(
            parse_event("time:2026-07-23T07:30:00+01:00", &ctx, &tz()).unwrap(),
            Event::Tick("2026-07-23T06:30:00Z".parse().unwrap())
        );
        for bad in [
            "d/S-1/state={}",
            "d/s-1/cmd/set={}",
            "d/s-1",
            "online:",
            "time:tomorrow",
            "hello",
        ] {
            let err = parse_event(bad, &ctx, &tz()).unwrap_err().to_string();
            assert!(err.starts_with(&format!("event {bad:?}: ")), "{err}");
        }
    }

    #[test]
    fn a_dry_run_follows_states_and_variables_through_the_events() {
        let ctx = Snapshot::default();
        let evs = events(
            &[
                r#"d/sensor-1/state={"t": 30}"#,
                r#"d/sensor-1/state={"t": 20}"#,
                "d/door-1/event/lock",
                r#"d/sensor-1/state={"t": 31}"#,
                "offline:fan-1",
                "time:2026-11-23T07:30",
                "time:2026-11-23T07:31",
            ],
            &ctx,
        );
        let isolated: HashSet<DeviceId> = [id("fan-1")].into();
        let at = "2026-11-23T12:00:00Z".parse().unwrap();
        let steps = run(&rules(), evs, at, &tz(), ctx, &isolated);
        let outcomes: Vec<Vec<(String, Outcome)>> = steps
            .iter()
            .map(|s| {
                s.rules
                    .iter()
                    .map(|r| (r.rule.clone(), r.outcome.clone()))
                    .collect()
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![
                // Hot: the fan would be told, but it is isolated.
                vec![(
                    "fan".to_owned(),
                    Outcome::Fires(vec![
                        r#"command d/fan-1/cmd/set {"on":true,"t":30} (not sent: fan-1 is isolated)"#
                            .to_owned()
                    ])
                )],
                // Cooler: no edge, nothing triggered.
                vec![],
                vec![(
                    "away".to_owned(),
                    Outcome::Fires(vec![r#"set mode = "away""#.to_owned(), "delay 5s".to_owned()])
                )],
                // Hot again, but the variable the previous step set now
                // fails the first condition.
                vec![("fan".to_owned(), Outcome::ConditionFails(1))],
                vec![(
                    "off".to_owned(),
                    Outcome::Disabled(vec!["log: fan gone".to_owned()])
                )],
                vec![(
                    "morning".to_owned(),
                    Outcome::Fires(vec!["log: morning".to_owned()])
                )],
                vec![],
            ]
        );
        assert_eq!(steps[0].event, r#"d/sensor-1/state {"t":30}"#);
    }
}
