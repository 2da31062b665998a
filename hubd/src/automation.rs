//! The automation engine's pure core: the rule language, its validation,
//! and the decision "this event, at this time, runs these actions".
//!
//! Nothing here does I/O, reads a clock, takes a lock or awaits: the runner
//! (later, in the daemon) passes in the event, the time as a
//! [`jiff::Timestamp`] and the local [`jiff::tz::TimeZone`], and a
//! [`Context`] with the devices' current states and the hub variables. It
//! publishes the [`Action::Command`]s it gets back to `d/<id>/cmd/<name>`
//! (never to an isolated device), waits out [`Action::Delay`]s, and asks a
//! [`RunLimiter`] before each run.
//!
//! # The rule language
//!
//! A rules file is TOML holding any number of `[[rule]]` tables; it is the
//! whole rule set, checked as a whole (see [`parse_rules`]).
//!
//! ```toml
//! [[rule]]
//! name = "fan on when hot"      # required, unique, 1 to 64 characters
//! description = "summer"        # optional
//! enabled = true                # default true
//! cooldown = "30s"              # optional: no new run within this time of the last
//! max_runs_per_minute = 10      # default 10, 1 to 600: loop protection at run time
//! trigger = { state = "sensor-1", pointer = "/temperature", op = ">", value = 25 }
//! conditions = [                # optional; all must hold
//!   { state = "fan-1", pointer = "/on", op = "==", value = false },
//!   { time = { after = "07:00", before = "22:00" } },
//!   { weekday = ["mon-fri", "sun"] },
//!   { var = "mode", op = "!=", value = "away" },
//! ]
//! actions = [                   # required, run in order
//!   { command = "fan-1", name = "set", payload = { on = true, level = "{{trigger.value}}" } },
//!   { delay = "5s" },
//!   { set_var = "last_hot", value = "{{trigger.value}}" },
//!   { log = "fan on at {{trigger.value}} from {{trigger.device}}" },
//! ]
//!
//! [[rule]]
//! name = "leaving"
//! trigger = { event = "door-1", name = "lock", pointer = "/by", op = "==", value = "keypad" }
//! actions = [{ set_var = "mode", value = "away" }]
//!
//! [[rule]]
//! name = "back"
//! trigger = { event = "door-1", name = "unlock" }
//! actions = [{ clear_var = "mode" }, { log = "welcome back, last hot {{var.last_hot}}" }]
//!
//! [[rule]]
//! name = "morning light"
//! trigger = { at = "07:30", days = ["mon-fri"] }   # or { cron = "0 30 7 * * mon-fri" }
//! conditions = [{ var = "mode", op = "!=", value = "away" }]
//!
//! [[rule.actions]]                # the same thing as actions = [{ ... }]
//! command = "lamp-1"
//! name = "set"
//! payload = { on = true }
//! ```
//!
//! The inline tables may also be written as `[rule.trigger]` and
//! `[[rule.actions]]` sections; unknown keys are refused everywhere.
//!
//! **Triggers** (exactly one per rule):
//!
//! | trigger | fires |
//! |---|---|
//! | `{ state = ID, pointer = P, op = OP, value = V }` | on `d/ID/state` when the test *becomes* true: it holds for the new state and did not hold for the previous one (or none was known). `pointer` defaults to `""`, the whole state. `op = "changed"` (no value) fires when the pointed value differs from the previous state's, appearing and disappearing included; it never fires without a previous state. |
//! | `{ event = ID, name = N, pointer = P, op = OP, value = V }` | on every `d/ID/event/N` whose payload passes the test. Without `name`, any event of ID; without `op`, any payload. |
//! | `{ online = ID }`, `{ offline = ID }` | when the device connects or goes away |
//! | `{ start = true }` | once when the hub starts |
//! | `{ every = "10m" }` | at every whole multiple of the interval since the Unix epoch (:00, :10, ...), so restarts do not shift it |
//! | `{ at = "07:30", days = ["mon-fri"] }` | at that local time (`HH:MM` or `HH:MM:SS`), on the given days (a list or one string like `"mon-fri"`; default every day) |
//! | `{ cron = "0 30 7 * * mon-fri" }` | local time; `sec min hour day month weekday`, or five fields without seconds ([`Cron`]) |
//!
//! Daylight saving for `at` and `cron`: a local time skipped by the clocks
//! going forward fires once at the moment they jump; a local time that happens
//! twice fires once, the first time (see [`schedule`]'s module doc).
//!
//! **Tests** (`op`): `==`, `!=`, `<`, `<=`, `>`, `>=`, `between` (`value = [low,
//! high]`, both included) and `changed`. Numbers compare by value (25 ==
//! 25.0); the ordering tests and `between` need a number `value` and are
//! false for any other type of value found. `!=` is exactly "not `==`", so it
//! holds for a missing value; every other test is false on a missing value.
//!
//! **Conditions** (all must hold, in the hub's local time): another device's
//! current state (`state` with `pointer`/`op`/`value`, not `changed`), a time
//! window (`after` included, `before` excluded, either may be left out; a
//! window with `after` later than `before` wraps midnight), weekdays (`mon`
//! .. `sun` and ranges that may wrap, `fri-mon`), a hub variable
//! (`var` with `op`/`value`).
//!
//! **Actions**: `command` publishes `payload` (any JSON, default `{}`) to
//! `d/ID/cmd/NAME`; `name` is one topic level of ASCII letters, digits, `-`,
//! `_` and `.`. `delay` waits (at most 24 hours). `set_var`/`clear_var` change
//! a hub variable (names: 1 to 64 of letters, digits, `_`, `-`). `log`
//! records a line in the rule's history.
//!
//! **Templates**: strings in `payload`, `set_var`'s `value` and `log` may hold
//! `{{trigger.value}}` (the value the trigger's pointer selected; state and
//! event triggers only), `{{trigger.device}}` (state, event, online and
//! offline triggers) and `{{var.NAME}}`. A payload string that is exactly one
//! reference becomes the raw JSON value (a number stays a number; null when
//! absent); elsewhere references are spliced into the text (strings as they
//! are, other values as JSON, absent values as nothing). `{{` always opens a
//! reference.
//!
//! **Durations**: `500ms`, `30s`, `10m`, `1h30m`, `2d`; more than zero, at
//! most a year.
//!
//! # Validation
//!
//! [`parse_rules`] refuses the whole file on any problem and reports every
//! one it finds with file, line and rule: syntax, unknown keys, wrong types,
//! unknown or malformed device ids, bad JSON pointers (RFC 6901), times,
//! durations, cron expressions (including ones that can never fire), weekday
//! names, duplicate rule names, unknown ops, values that do not fit the op,
//! command and event names that are not topic levels, unknown `{{...}}`
//! references, references to a trigger value or device the trigger does not
//! have, variables no rule ever sets, and self-triggering rules.
//!
//! **Self-triggering rule** (refused): the trigger is a `state` or `event`
//! trigger on device D, an action is a `command` to D, the rule has no
//! `cooldown`, and none of its conditions looks at D's state. A command to the
//! device a rule watches can make that device publish again and so run the
//! rule again; a cooldown bounds the rate, and a condition on D's own state
//! (like "only while it is off") lets the command's effect stop the loop.
//! Loops through several rules are left to `max_runs_per_minute`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::Value;

use crate::model::DeviceId;

mod describe;
pub mod dryrun;
mod limiter;
mod parse;
pub mod ruleset;
mod runner;
pub mod schedule;
mod value;

pub use limiter::{Refusal, RunLimiter};
pub use parse::parse_rules;
pub use runner::{
    AutomationHandle, Clock, CommandFuture, Outcome, Publisher, RuleInfo, RunRecord, SendError,
    Setup, Status, start,
};
pub use schedule::{Cron, Schedule, TimeWindow, Weekdays, fires_at, next_fire};
pub use value::{Bindings, Payload, Pointer, Ref, Test, Text};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A rules file has problems: every one found, in line order. Nothing
    /// from the file may be used.
    #[error("{}", join_lines(.0))]
    Rules(Vec<Problem>),
    /// A rule name given on its own (to `hubctl rules enable`, say) is not
    /// a valid name.
    #[error("rule name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    /// No stored rule has this name.
    #[error("no rule named {0:?} (hubctl rules list shows them)")]
    UnknownRule(String),
    /// A dry-run event or time that cannot be read.
    #[error("event {event:?}: {reason}")]
    BadEvent { event: String, reason: String },
    /// The rule store failed; nothing was changed.
    #[error("rule store: {0}")]
    Store(String),
    /// The runner has stopped (the hub is shutting down).
    #[error("the automation runner has stopped")]
    Stopped,
}

fn join_lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One problem in a rules file, displayed as
/// `rules.toml:12: rule "fan": trigger: unknown device "abc"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// The rule it is in; `None` for problems outside every rule.
    pub rule: Option<RuleRef>,
    /// What is wrong, starting with the part of the rule (`trigger: `,
    /// `action 2: `) where there is one.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(rule) = &self.rule {
            write!(f, "{rule}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// How a problem names its rule: by name when it has a valid one, else by
/// its place in the file (`#1` is the first `[[rule]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleRef {
    Named(RuleName),
    Numbered(usize),
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleRef::Named(name) => write!(f, "rule {:?}", name.as_str()),
            RuleRef::Numbered(n) => write!(f, "rule #{n}"),
        }
    }
}

/// A rule's name, which is its identity: unique in the rule set, 1 to 64
/// characters, no control characters, not only white space.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleName(String);

impl RuleName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::BadName {
            name: s.to_owned(),
            reason,
        };
        if s.trim().is_empty() {
            return Err(bad("is empty"));
        }
        if s.chars().count() > 64 {
            return Err(bad("is longer than 64 characters"));
        }
        if s.chars().any(char::is_control) {
            return Err(bad("contains a control character"));
        }
        Ok(RuleName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: RuleName,
    pub description: Option<String>,
    pub enabled: bool,
    /// No new run within this time of the last one.
    pub cooldown: Option<Duration>,
    pub max_runs_per_minute: u32,
    pub trigger: Trigger,
    pub conditions: Vec<Condition>,
    /// Never empty.
    pub actions: Vec<ActionTemplate>,
}

impl Rule {
    /// Whether the rule names `device` anywhere: trigger, condition or command.
    pub fn names_device(&self, device: &DeviceId) -> bool {
        self.trigger.device() == Some(device)
            || self
                .conditions
                .iter()
                .any(|c| matches!(c, Condition::State { device: d, .. } if d == device))
            || self
                .actions
                .iter()
                .any(|a| matches!(a, ActionTemplate::Command { device: d, .. } if d == device))
    }

    /// The schedule the runner must wake up for, if the trigger is one.
    pub fn schedule(&self) -> Option<&Schedule> {
        match &self.trigger {
            Trigger::Schedule(s) => Some(s),
            _ => None,
        }
    }
}

/// What starts a rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// `d/<device>/state` made `test` true (see the module doc: edges, not levels).
    State {
        device: DeviceId,
        pointer: Pointer,
        test: Test,
    },
    /// `d/<device>/event/<name>` (any name when `None`) passed `test` (any
    /// payload when `None`).
    Event {
        device: DeviceId,
        name: Option<String>,
        pointer: Pointer,
        test: Option<Test>,
    },
    Online(DeviceId),
    Offline(DeviceId),
    Start,
    Schedule(Schedule),
}

impl Trigger {
    /// The device a trigger watches, if any.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Trigger::State { device, .. }
            | Trigger::Event { device, .. }
            | Trigger::Online(device)
            | Trigger::Offline(device) => Some(device),
            Trigger::Start | Trigger::Schedule(_) => None,
        }
    }

    /// Whether the trigger selects a value for `{{trigger.value}}`.
    fn has_value(&self) -> bool {
        matches!(self, Trigger::State { .. } | Trigger::Event { .. })
    }
}

/// What must hold, when a rule is triggered, for it to run.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// A device's current state passes a test (never `Changed`).
    State {
        device: DeviceId,
        pointer: Pointer,
        test: Test,
    },
    /// The local time of day is in the window.
    Time(TimeWindow),
    /// The local day of the week is in the set.
    Weekday(Weekdays),
    /// A hub variable passes a test (an unset variable is a missing value).
    Var { name: String, test: Test },
}

impl Condition {
    fn holds(&self, now: Timestamp, tz: &TimeZone, ctx: &dyn Context) -> bool {
        match self {
            Condition::State {
                device,
                pointer,
                test,
            } => test.holds(ctx.state(device).and_then(|s| pointer.resolve(s))),
            Condition::Time(window) => window.contains(tz.to_datetime(now).time()),
            Condition::Weekday(days) => days.contains(tz.to_datetime(now).weekday()),
            Condition::Var { name, test } => test.holds(ctx.var(name)),
        }
    }
}

/// An action as written in the rule, with its templates.
#[derive(Clone, Debug, PartialEq)]
pub enum ActionTemplate {
    Command {
        device: DeviceId,
        name: String,
        payload: Payload,
    },
    Delay(Duration),
    SetVar {
        name: String,
        value: Payload,
    },
    ClearVar {
        name: String,
    },
    Log(Text),
}

impl ActionTemplate {
    fn render(&self, b: &Bindings<'_>) -> Action {
        match self {
            ActionTemplate::Command {
                device,
                name,
                payload,
            } => Action::Command {
                device: device.clone(),
                name: name.clone(),
                payload: payload.render(b),
            },
            ActionTemplate::Delay(d) => Action::Delay(*d),
            ActionTemplate::SetVar { name, value } => Action::SetVar {
                name: name.clone(),
                value: value.render(b),
            },
            ActionTemplate::ClearVar { name } => Action::ClearVar { name: name.clone() },
            ActionTemplate::Log(text) => Action::Log(text.render(b)),
        }
    }
}

/// What the runner does, in order, when a rule runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Publish `payload` (as JSON) to `d/<device>/cmd/<name>`, unless the
    /// device is isolated.
    Command {
        device: DeviceId,
        name: String,
        payload: Value,
    },
    /// Wait before the next action.
    Delay(Duration),
    SetVar {
        name: String,
        value: Value,
    },
    ClearVar {
        name: String,
    },
    /// A line for the rule's history.
    Log(String),
}

impl Action {
    /// The topic a command goes to.
    pub fn topic(&self) -> Option<String> {
        match self {
            Action::Command { device, name, .. } => Some(format!("d/{device}/cmd/{name}")),
            _ => None,
        }
    }
}

/// Something that happened, as the runner hands it to [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A device published `d/<device>/state`. `previous` is its state before
    /// this one, `None` if none was known (its first state ever); the runner
    /// seeds it from the retained states at start, so a restart does not
    /// look like a change.
    State {
        device: DeviceId,
        value: Value,
        previous: Option<Value>,
    },
    /// A device published `d/<device>/event/<name>`.
    Event {
        device: DeviceId,
        name: String,
        value: Value,
    },
    Online(DeviceId),
    Offline(DeviceId),
    /// The hub has started (once per process).
    Start,
    /// A scheduled instant has come: exactly an instant [`next_fire`]
    /// returned, not the time the runner woke up.
    Tick(Timestamp),
}

impl Event {
    /// The event for a device's publish, if it is a state or an event: JSON
    /// payloads as JSON, anything else as a (lossy UTF-8) string.
    pub fn from_publish(topic: &str, payload: &[u8], previous: Option<Value>) -> Option<Event> {
        let rest = topic.strip_prefix("d/")?;
        let (id, kind) = rest.split_once('/')?;
        let device = DeviceId::parse(id).ok()?;
        let value = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        if kind == "state" {
            return Some(Event::State {
                device,
                value,
                previous,
            });
        }
        let name = kind.strip_prefix("event/").filter(|n| !n.is_empty())?;
        Some(Event::Event {
            device,
            name: name.to_owned(),
            value,
        })
    }
}

/// What the engine may read about the hub when it evaluates a rule. The
/// runner updates a device's state here before it evaluates that device's
/// state event, so conditions see the new state.
pub trait Context {
    /// The device's last state, if it has published one.
    fn state(&self, device: &DeviceId) -> Option<&Value>;
    /// A hub variable, if set.
    fn var(&self, name: &str) -> Option<&Value>;
}

/// A plain [`Context`]: for tests and for dry runs (`hubctl rules test`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub states: HashMap<DeviceId, Value>,
    pub vars: HashMap<String, Value>,
}

impl Context for Snapshot {
    fn state(&self, device: &DeviceId) -> Option<&Value> {
        self.states.get(device)
    }

    fn var(&self, name: &str) -> Option<&Value> {
        self.vars.get(name)
    }
}

/// The outcome of [`check`]: why a rule does not run, or what it does.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Disabled,
    NotTriggered,
    /// Triggered, but the condition at this index (0-based) did not hold.
    ConditionFailed {
        index: usize,
    },
    /// Runs these actions (never empty), subject to the [`RunLimiter`].
    Fire(Vec<Action>),
}

/// Evaluates one rule for one event: the actions to run, with templates
/// filled in, or nothing.
pub fn evaluate(
    rule: &Rule,
    event: &Event,
    now: Timestamp,
    tz: &TimeZone,
    ctx: &dyn Context,
) -> Vec<Action> {
    match check(rule, event, now, tz, ctx) {
        Verdict::Fire(actions) => actions,
        Verdict::Disabled | Verdict::NotTriggered | Verdict::ConditionFailed { .. } => Vec::new(),
    }
}

/// Like [`evaluate`], but says why a rule does not run (for dry runs and the
/// rule history).
pub fn check(
    rule: &Rule,
    event: &Event,
    now: Timestamp,
    tz: &TimeZone,
    ctx: &dyn Context,
) -> Verdict {
    if !rule.enabled {
        return Verdict::Disabled;
    }
    let Some(fired) = match_trigger(&rule.trigger, event, tz) else {
        return Verdict::NotTriggered;
    };
    if let Some(index) = rule.conditions.iter().position(|c| !c.holds(now, tz, ctx)) {
        return Verdict::ConditionFailed { index };
    }
    let bindings = Bindings {
        trigger_value: fired.value,
        trigger_device: fired.device,
        ctx,
    };
    Verdict::Fire(rule.actions.iter().map(|a| a.render(&bindings)).collect())
}

/// What a matched trigger binds for the templates.
struct Fired<'a> {
    value: Option<&'a Value>,
    device: Option<&'a DeviceId>,
}

fn match_trigger<'a>(trigger: &Trigger, event: &'a Event, tz: &TimeZone) -> Option<Fired<'a>> {
    let on = |device: &'a DeviceId| Fired {
        value: None,
        device: Some(device),
    };
    match (trigger, event) {
        (
            Trigger::State {
                device,
                pointer,
                test,
            },
            Event::State {
                device: from,
                value,
                previous,
            },
        ) if device == from => {
            let new = pointer.resolve(value);
            let old = previous.as_ref().map(|p| pointer.resolve(p));
            let fires = match test {
                // Without a previous state there is nothing to differ from.
                Test::Changed => old.is_some_and(|old| value::differs(old, new)),
                // An edge: true now, and not already true before.
                _ => test.holds(new) && !old.is_some_and(|old| test.holds(old)),
            };
            fires.then_some(Fired {
                value: new,
                device: Some(from),
            })
        }
        (
            Trigger::Event {
                device,
                name,
                pointer,
                test,
            },
            Event::Event {
                device: from,
                name: got,
                value,
            },
        ) if device == from && name.as_ref().is_none_or(|n| n == got) => {
            let selected = pointer.resolve(value);
            test.as_ref()
                .is_none_or(|t| t.holds(selected))
                .then_some(Fired {
                    value: selected,
                    device: Some(from),
                })
        }
        (Trigger::Online(device), Event::Online(from))
        | (Trigger::Offline(device), Event::Offline(from))
            if device == from =>
        {
            Some(on(from))
        }
        (Trigger::Start, Event::Start) => Some(Fired {
            value: None,
            device: None,
        }),
        (Trigger::Schedule(schedule), Event::Tick(at)) if fires_at(schedule, *at, tz) => {
            Some(Fired {
                value: None,
                device: None,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
