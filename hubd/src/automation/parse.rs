//! Reading a rules file: TOML text to validated [`Rule`]s, or every problem
//! found, each with its file, line and rule.
//!
//! The file is walked by hand over toml's spanned document tree instead of
//! being deserialised with serde: serde stops at the first problem and does
//! not know which rule it was in, while a householder fixing a file wants all
//! of them at once, each naming its rule and line.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use serde_json::{Map, Number, Value};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::model::DeviceId;

use super::schedule::{self, Cron, Schedule, TimeWindow, Weekdays};
use super::value::{self, Payload, Pointer, Ref, Test, Text};
use super::{ActionTemplate, Condition, Error, Problem, Rule, RuleName, RuleRef, Trigger};

type Span = Range<usize>;
type Item<'i> = Spanned<DeValue<'i>>;

/// Runs per minute when a rule does not say.
const DEFAULT_MAX_RUNS_PER_MINUTE: u32 = 10;
/// The most runs per minute a rule may ask for: ten a second is already
/// more than any household automation needs, and beyond it a loop floods
/// devices before anyone notices.
const MAX_RUNS_PER_MINUTE: i64 = 600;
/// The longest `delay`: a longer wait is a schedule, not a pause.
const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);
const MAX_DESCRIPTION_CHARS: usize = 256;
const MAX_LOG_CHARS: usize = 1024;
/// How deeply JSON values in a rule may nest: deep enough for any payload,
/// shallow enough that walking one cannot exhaust the stack.
const MAX_DEPTH: usize = 32;

const RULE_KEYS: &[&str] = &[
    "name",
    "description",
    "enabled",
    "cooldown",
    "max_runs_per_minute",
    "trigger",
    "conditions",
    "actions",
];
const TRIGGER_KINDS: &[&str] = &[
    "state", "event", "online", "offline", "start", "every", "at", "cron",
];
const CONDITION_KINDS: &[&str] = &["state", "time", "weekday", "var"];
const ACTION_KINDS: &[&str] = &["command", "delay", "set_var", "clear_var", "log"];
const OPS: &str = "==, !=, <, <=, >, >=, between or changed";

/// Parses and validates a whole rules file. `file` names it in messages;
/// `known_devices` says whether a device id is registered. On any problem
/// the whole file is refused with [`Error::Rules`] listing every problem
/// found, in line order.
pub fn parse_rules(
    text: &str,
    file: &str,
    known_devices: &dyn Fn(&str) -> bool,
) -> Result<Vec<Rule>, Error> {
    let mut p = Parser {
        text,
        file,
        known_devices,
        problems: Vec::new(),
        vars_set: HashSet::new(),
        vars_used: Vec::new(),
    };
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let at = At::file();
            p.err(
                &at,
                e.span().unwrap_or(0..0),
                format!("not valid TOML: {}", e.message()),
            );
            return Err(p.into_error());
        }
    };
    let mut rules = Vec::new();
    let mut names: HashMap<RuleName, usize> = HashMap::new();
    for (key, item) in doc.get_ref().iter() {
        if key.get_ref() != "rule" {
            p.err(
                &At::file(),
                key.span(),
                format!(
                    "unknown key {:?}: a rules file holds only [[rule]] tables",
                    key.get_ref()
                ),
            );
            continue;
        }
        let DeValue::Array(items) = item.get_ref() else {
            p.err(
                &At::file(),
                item.span(),
                "rule: write each rule as a [[rule]] table",
            );
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let (name, rule) = p.rule(i + 1, item);
            // Duplicates are looked for among all named rules, valid or not,
            // so fixing one problem does not reveal another.
            if let Some((name, span)) = name {
                let line = p.line(&span);
                match names.get(&name) {
                    Some(first) => {
                        let msg = format!("name: the rule at line {first} has the same name");
                        p.err(&At::rule(RuleRef::Named(name)), span, msg);
                    }
                    None => {
                        names.insert(name, line);
                    }
                }
            }
            rules.extend(rule);
        }
    }
    // A variable that no rule sets can never have a value: almost always a
    // typo, caught here rather than as a rule that silently never runs.
    for (name, span, at) in std::mem::take(&mut p.vars_used) {
        if !p.vars_set.contains(&name) {
            let msg = format!("variable {name:?} is never set (no rule has set_var = {name:?})");
            p.err(&at, span, msg);
        }
    }
    if p.problems.is_empty() {
        Ok(rules)
    } else {
        Err(p.into_error())
    }
}

/// Where in the file a problem is: which rule, and which part of it.
#[derive(Clone, Debug)]
struct At {
    rule: Option<RuleRef>,
    place: String,
}

impl At {
    fn file() -> Self {
        At {
            rule: None,
            place: String::new(),
        }
    }

    fn rule(rule: RuleRef) -> Self {
        At {
            rule: Some(rule),
            place: String::new(),
        }
    }

    fn part(&self, place: String) -> Self {
        At {
            rule: self.rule.clone(),
            place,
        }
    }
}

/// The state of one walk over a file.
struct Parser<'t> {
    text: &'t str,
    file: &'t str,
    known_devices: &'t dyn Fn(&str) -> bool,
    problems: Vec<Problem>,
    /// Every variable some `set_var` sets.
    vars_set: HashSet<String>,
    /// Every variable read by a condition or a template, with where.
    vars_used: Vec<(String, Span, At)>,
}

/// What a test may be in a given place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TestRules {
    /// A state trigger: `op` required, `changed` allowed.
    StateTrigger,
    /// An event trigger: `op` optional, `changed` not allowed.
    EventTrigger,
    /// A condition: `op` required, `changed` not allowed.
    Condition,
}

impl<'t> Parser<'t> {
    fn line(&self, span: &Span) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn err(&mut self, at: &At, span: Span, message: impl Into<String>) {
        let message = message.into();
        let message = if at.place.is_empty() {
            message
        } else {
            format!("{}: {message}", at.place)
        };
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: self.line(&span),
            rule: at.rule.clone(),
            message,
        });
    }

    fn into_error(mut self) -> Error {
        self.problems.sort_by_key(|p| p.line);
        Error::Rules(self.problems)
    }

    /// Reports every key of `map` not in `allowed`.
    fn keys(&mut self, at: &At, map: &DeTable<'_>, allowed: &[&str]) {
        for (key, _) in map.iter() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                let msg = format!(
                    "unknown key {:?} (expected {})",
                    key.get_ref(),
                    allowed.join(", ")
                );
                self.err(at, key.span(), msg);
            }
        }
    }

    fn required<'a, 'i>(
        &mut self,
        at: &At,
        map: &'a DeTable<'i>,
        span: &Span,
        key: &str,
    ) -> Option<&'a Item<'i>> {
        let item = map.get(key);
        if item.is_none() {
            self.err(at, span.clone(), format!("missing {key}"));
        }
        item
    }

    fn wrong_type(&mut self, at: &At, key: &str, item: &Item<'_>, expected: &str) {
        let msg = format!(
            "{key}: expected {expected}, found {}",
            type_name(item.get_ref())
        );
        self.err(at, item.span(), msg);
    }

    fn string<'a>(&mut self, at: &At, key: &str, item: &'a Item<'_>) -> Option<&'a str> {
        match item.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.wrong_type(at, key, item, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<bool> {
        match item.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(at, key, item, "true or false");
                None
            }
        }
    }

    fn table<'a, 'i>(&mut self, at: &At, key: &str, item: &'a Item<'i>) -> Option<&'a DeTable<'i>> {
        match item.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(at, key, item, "a table");
                None
            }
        }
    }

    fn array<'a, 'i>(&mut self, at: &At, key: &str, item: &'a Item<'i>) -> Option<&'a [Item<'i>]> {
        match item.get_ref() {
            DeValue::Array(a) => Some(a.as_ref()),
            _ => {
                self.wrong_type(at, key, item, "an array");
                None
            }
        }
    }

    fn json(&mut self, at: &At, item: &Item<'_>) -> Option<Value> {
        match to_json(item, 0) {
            Ok(v) => Some(v),
            Err((span, msg)) => {
                self.err(at, span, msg);
                None
            }
        }
    }

    fn device(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<DeviceId> {
        let s = self.string(at, key, item)?;
        match DeviceId::parse(s) {
            Err(e) => {
                self.err(at, item.span(), e.to_string());
                None
            }
            Ok(_) if !(self.known_devices)(s) => {
                self.err(at, item.span(), format!("unknown device {s:?}"));
                None
            }
            Ok(id) => Some(id),
        }
    }

    fn duration(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<Duration> {
        let s = self.string(at, key, item)?;
        match schedule::parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(at, item.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    fn time(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<jiff::civil::Time> {
        let s = self.string(at, key, item)?;
        match schedule::parse_time(s) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(at, item.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    /// `days = ["mon", "wed-fri"]` or `days = "mon-fri"`.
    fn weekdays(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<Weekdays> {
        let names: Vec<&str> = match item.get_ref() {
            DeValue::String(s) => vec![s.as_ref()],
            DeValue::Array(items) => {
                let mut names = Vec::new();
                for it in items.iter() {
                    names.push(self.string(at, key, it)?);
                }
                names
            }
            _ => {
                self.wrong_type(at, key, item, "an array of day names");
                return None;
            }
        };
        match Weekdays::parse(names) {
            Ok(w) => Some(w),
            Err(e) => {
                self.err(at, item.span(), format!("{key}: {e}"));
                None
            }
        }
    }

    /// `pointer`, defaulting to the whole document.
    fn pointer(&mut self, at: &At, map: &DeTable<'_>) -> Option<Pointer> {
        let Some(item) = map.get("pointer") else {
            return Some(Pointer::root());
        };
        let s = self.string(at, "pointer", item)?;
        match Pointer::parse(s) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(at, item.span(), e);
                None
            }
        }
    }

    fn number(&mut self, at: &At, op: &str, item: &Item<'_>) -> Option<Number> {
        match self.json(at, item)? {
            Value::Number(n) => Some(n),
            other => {
                let msg = format!(
                    "op {op:?} compares numbers, but value is {}",
                    json_type_name(&other)
                );
                self.err(at, item.span(), msg);
                None
            }
        }
    }

    /// `op` and `value`. `Some(None)`: no test (only where `op` is optional).
    fn test(
        &mut self,
        at: &At,
        map: &DeTable<'_>,
        span: &Span,
        rules: TestRules,
    ) -> Option<Option<Test>> {
        let value = map.get("value");
        let Some(op_item) = map.get("op") else {
            if let Some(v) = value {
                self.err(at, v.span(), "value without op");
                return None;
            }
            return match rules {
                TestRules::EventTrigger => {
                    if let Some(p) = map.get("pointer") {
                        self.err(at, p.span(), "pointer without op");
                        return None;
                    }
                    Some(None)
                }
                TestRules::StateTrigger => {
                    let msg = format!("missing op ({OPS}); op = \"changed\" fires on any change");
                    self.err(at, span.clone(), msg);
                    None
                }
                TestRules::Condition => {
                    self.err(at, span.clone(), format!("missing op ({OPS})"));
                    None
                }
            };
        };
        let op = self.string(at, "op", op_item)?;
        let needs_value = matches!(op, "==" | "!=" | "<" | "<=" | ">" | ">=" | "between");
        let operand = match value {
            Some(v) if needs_value => Some(v),
            None if needs_value => {
                self.err(at, span.clone(), format!("op {op:?} needs a value"));
                return None;
            }
            _ => None,
        };
        let test = match (op, operand) {
            ("==", Some(v)) => Test::Eq(self.json(at, v)?),
            ("!=", Some(v)) => Test::Ne(self.json(at, v)?),
            ("<", Some(v)) => Test::Lt(self.number(at, op, v)?),
            ("<=", Some(v)) => Test::Le(self.number(at, op, v)?),
            (">", Some(v)) => Test::Gt(self.number(at, op, v)?),
            (">=", Some(v)) => Test::Ge(self.number(at, op, v)?),
            ("between", Some(item)) => {
                let bad = "op \"between\" needs value = [low, high], two numbers with low <= high";
                let pair = match item.get_ref() {
                    DeValue::Array(a) if a.len() == 2 => {
                        (self.number(at, op, &a[0]), self.number(at, op, &a[1]))
                    }
                    _ => (None, None),
                };
                match pair {
                    (Some(lo), Some(hi))
                        if value::number_cmp(&lo, &hi) != Some(std::cmp::Ordering::Greater) =>
                    {
                        Test::Between(lo, hi)
                    }
                    _ => {
                        self.err(at, item.span(), bad);
                        return None;
                    }
                }
            }
            ("changed", _) => {
                if rules != TestRules::StateTrigger {
                    self.err(
                        at,
                        op_item.span(),
                        "op \"changed\" is only for state triggers (it compares with the previous state)",
                    );
                    return None;
                }
                if let Some(v) = value {
                    self.err(at, v.span(), "op \"changed\" takes no value");
                    return None;
                }
                Test::Changed
            }
            (other, _) => {
                self.err(
                    at,
                    op_item.span(),
                    format!("unknown op {other:?} (use {OPS})"),
                );
                return None;
            }
        };
        Some(Some(test))
    }

    /// Which single kind key a trigger, condition or action table has.
    fn kind(
        &mut self,
        at: &At,
        map: &DeTable<'_>,
        span: &Span,
        kinds: &[&'static str],
    ) -> Option<&'static str> {
        let present: Vec<&'static str> = kinds
            .iter()
            .copied()
            .filter(|k| map.get(*k).is_some())
            .collect();
        match present.as_slice() {
            [one] => Some(one),
            [] => {
                let msg = format!("needs one of {}", kinds.join(", "));
                self.err(at, span.clone(), msg);
                None
            }
            [first, second, ..] => {
                let msg = format!("has both {first:?} and {second:?}: write one per table");
                self.err(at, span.clone(), msg);
                None
            }
        }
    }

    /// A name of one MQTT topic level (a command), or of several (an event).
    fn topic_name(&mut self, at: &At, key: &str, item: &Item<'_>, levels: bool) -> Option<String> {
        let s = self.string(at, key, item)?;
        let ok = if levels {
            s.len() <= 128 && s.split('/').all(valid_level)
        } else {
            valid_level(s)
        };
        if !ok {
            let what = if levels {
                "topic levels separated by '/', each"
            } else {
                "one topic level:"
            };
            let msg = format!("{key} {s:?} must be {what} 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.'");
            self.err(at, item.span(), msg);
            return None;
        }
        Some(s.to_owned())
    }

    fn var_name(&mut self, at: &At, key: &str, item: &Item<'_>) -> Option<String> {
        let s = self.string(at, key, item)?;
        if !value::valid_var_name(s) {
            let msg = format!("variable name {s:?} must be 1 to 64 of a-z, A-Z, 0-9, '_', '-'");
            self.err(at, item.span(), msg);
            return None;
        }
        Some(s.to_owned())
    }

    /// One `[[rule]]`: its name and the name's span if the name is valid
    /// (for the duplicate check), and the rule if all of it is.
    fn rule(&mut self, index: usize, item: &Item<'_>) -> (Option<(RuleName, Span)>, Option<Rule>) {
        let span = item.span();
        let mut at = At::rule(RuleRef::Numbered(index));
        let Some(map) = self.table(&at, "rule", item) else {
            return (None, None);
        };
        let before = self.problems.len();
        // The name first, so that every other problem can name the rule.
        let name_item = self.required(&at, map, &span, "name");
        let name = name_item.and_then(|it| {
            let s = self.string(&at, "name", it)?;
            match RuleName::parse(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.err(&at, it.span(), e.to_string());
                    None
                }
            }
        });
        if let Some(n) = &name {
            at = At::rule(RuleRef::Named(n.clone()));
        }
        self.keys(&at, map, RULE_KEYS);

        let description = map.get("description").and_then(|it| {
            let s = self.string(&at, "description", it)?;
            if s.chars().count() > MAX_DESCRIPTION_CHARS {
                let msg = format!("description is longer than {MAX_DESCRIPTION_CHARS} characters");
                self.err(&at, it.span(), msg);
            }
            Some(s.to_owned())
        });
        let enabled = match map.get("enabled") {
            Some(it) => self.boolean(&at, "enabled", it),
            None => Some(true),
        };
        let cooldown = map
            .get("cooldown")
            .map(|it| self.duration(&at, "cooldown", it));
        let max_runs = match map.get("max_runs_per_minute") {
            None => Some(DEFAULT_MAX_RUNS_PER_MINUTE),
            Some(it) => match it.get_ref() {
                DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .filter(|n| (1..=MAX_RUNS_PER_MINUTE).contains(n))
                    .and_then(|n| u32::try_from(n).ok())
                    .or_else(|| {
                        let msg = format!(
                            "max_runs_per_minute must be 1 to {MAX_RUNS_PER_MINUTE} (to stop a rule, set enabled = false)"
                        );
                        self.err(&at, it.span(), msg);
                        None
                    }),
                _ => {
                    self.wrong_type(&at, "max_runs_per_minute", it, "an integer");
                    None
                }
            },
        };

        let trigger_at = at.part("trigger".to_owned());
        let trigger = self
            .required(&at, map, &span, "trigger")
            .and_then(|it| self.trigger(&trigger_at, it));

        let mut conditions = Some(Vec::new());
        if let Some(it) = map.get("conditions")
            && let Some(items) = self.array(&at, "conditions", it)
        {
            for (i, item) in items.iter().enumerate() {
                let c_at = at.part(format!("condition {}", i + 1));
                let c = self.condition(&c_at, item);
                match (c, conditions.as_mut()) {
                    (Some(c), Some(list)) => list.push(c),
                    _ => conditions = None,
                }
            }
        }

        let mut actions = Some(Vec::new());
        let mut commands = Vec::new();
        if let Some(it) = self.required(&at, map, &span, "actions")
            && let Some(items) = self.array(&at, "actions", it)
        {
            if items.is_empty() {
                self.err(&at, it.span(), "actions: a rule needs at least one action");
            }
            for (i, item) in items.iter().enumerate() {
                let a_at = at.part(format!("action {}", i + 1));
                let a = self.action(&a_at, item, trigger.as_ref());
                if let Some(ActionTemplate::Command { device, .. }) = &a {
                    commands.push((device.clone(), item.span(), a_at));
                }
                match (a, actions.as_mut()) {
                    (Some(a), Some(list)) => list.push(a),
                    _ => actions = None,
                }
            }
        }

        // Self-triggering: see the module doc for the precise rule.
        if let (Some(trigger), None, Some(conds)) = (&trigger, &cooldown, &conditions)
            && let Trigger::State { device, .. } | Trigger::Event { device, .. } = trigger
        {
            let guarded = conds
                .iter()
                .any(|c| matches!(c, Condition::State { device: d, .. } if d == device));
            if !guarded {
                for (target, span, a_at) in &commands {
                    if target == device {
                        let msg = format!(
                            "would retrigger itself (the trigger watches {device:?}, which this commands): add a cooldown or a condition on the state of {device:?}",
                            device = device.as_str()
                        );
                        self.err(a_at, span.clone(), msg);
                    }
                }
            }
        }

        let named = name.clone().zip(name_item.map(Spanned::span));
        if self.problems.len() > before {
            return (named, None);
        }
        let rule = match (name, enabled, max_runs, trigger, conditions, actions) {
            (
                Some(name),
                Some(enabled),
                Some(max_runs_per_minute),
                Some(trigger),
                Some(conditions),
                Some(actions),
            ) => Some(Rule {
                name,
                description,
                enabled,
                cooldown: cooldown.flatten(),
                max_runs_per_minute,
                trigger,
                conditions,
                actions,
            }),
            _ => None,
        };
        (named, rule)
    }

    fn trigger(&mut self, at: &At, item: &Item<'_>) -> Option<Trigger> {
        let span = item.span();
        let map = self.table(at, "trigger", item)?;
        let kind = self.kind(at, map, &span, TRIGGER_KINDS)?;
        let allowed: &[&str] = match kind {
            "state" => &["state", "pointer", "op", "value"],
            "event" => &["event", "name", "pointer", "op", "value"],
            "at" => &["at", "days"],
            other => &[other],
        };
        self.keys(at, map, allowed);
        let value = map.get(kind)?;
        match kind {
            "state" => {
                let device = self.device(at, "state", value);
                let pointer = self.pointer(at, map);
                let test = self.test(at, map, &span, TestRules::StateTrigger);
                Some(Trigger::State {
                    device: device?,
                    pointer: pointer?,
                    test: test.flatten()?,
                })
            }
            "event" => {
                let device = self.device(at, "event", value);
                let name = match map.get("name") {
                    Some(it) => self.topic_name(at, "name", it, true).map(Some),
                    None => Some(None),
                };
                let pointer = self.pointer(at, map);
                let test = self.test(at, map, &span, TestRules::EventTrigger);
                Some(Trigger::Event {
                    device: device?,
                    name: name?,
                    pointer: pointer?,
                    test: test?,
                })
            }
            "online" => Some(Trigger::Online(self.device(at, "online", value)?)),
            "offline" => Some(Trigger::Offline(self.device(at, "offline", value)?)),
            "start" => match self.boolean(at, "start", value)? {
                true => Some(Trigger::Start),
                false => {
                    self.err(
                        at,
                        value.span(),
                        "start = false never fires: write start = true (and enabled = false to pause the rule)",
                    );
                    None
                }
            },
            "every" => {
                let d = self.duration(at, "every", value)?;
                if d < Duration::from_secs(1) {
                    self.err(at, value.span(), "every: the shortest interval is 1s");
                    return None;
                }
                Some(Trigger::Schedule(Schedule::Every(d)))
            }
            "at" => {
                let time = self.time(at, "at", value);
                let days = match map.get("days") {
                    Some(it) => self.weekdays(at, "days", it),
                    None => Some(Weekdays::ALL),
                };
                Some(Trigger::Schedule(Schedule::At {
                    time: time?,
                    days: days?,
                }))
            }
            "cron" => {
                let s = self.string(at, "cron", value)?;
                match Cron::parse(s) {
                    Ok(c) => Some(Trigger::Schedule(Schedule::Cron(c))),
                    Err(e) => {
                        self.err(at, value.span(), e);
                        None
                    }
                }
            }
            _ => None,
        }
    }

    fn condition(&mut self, at: &At, item: &Item<'_>) -> Option<Condition> {
        let span = item.span();
        let map = self.table(at, "condition", item)?;
        let kind = self.kind(at, map, &span, CONDITION_KINDS)?;
        let allowed: &[&str] = match kind {
            "state" => &["state", "pointer", "op", "value"],
            "var" => &["var", "op", "value"],
            other => &[other],
        };
        self.keys(at, map, allowed);
        let value = map.get(kind)?;
        match kind {
            "state" => {
                let device = self.device(at, "state", value);
                let pointer = self.pointer(at, map);
                let test = self.test(at, map, &span, TestRules::Condition);
                Some(Condition::State {
                    device: device?,
                    pointer: pointer?,
                    test: test.flatten()?,
                })
            }
            "time" => {
                let window = self.table(at, "time", value)?;
                self.keys(at, window, &["after", "before"]);
                let after = window.get("after").map(|it| self.time(at, "after", it));
                let before = window.get("before").map(|it| self.time(at, "before", it));
                let window = TimeWindow {
                    after: after.unwrap_or(None),
                    before: before.unwrap_or(None),
                };
                match (after, before) {
                    (Some(None), _) | (_, Some(None)) => None,
                    (None, None) => {
                        self.err(at, value.span(), "time needs after, before or both");
                        None
                    }
                    _ if window.after.is_some() && window.after == window.before => {
                        self.err(
                            at,
                            value.span(),
                            "time: after and before are equal, so the window is empty",
                        );
                        None
                    }
                    _ => Some(Condition::Time(window)),
                }
            }
            "weekday" => Some(Condition::Weekday(self.weekdays(at, "weekday", value)?)),
            "var" => {
                let name = self.var_name(at, "var", value);
                let test = self.test(at, map, &span, TestRules::Condition);
                let name = name?;
                self.vars_used
                    .push((name.clone(), value.span(), at.clone()));
                Some(Condition::Var {
                    name,
                    test: test.flatten()?,
                })
            }
            _ => None,
        }
    }

    fn action(
        &mut self,
        at: &At,
        item: &Item<'_>,
        trigger: Option<&Trigger>,
    ) -> Option<ActionTemplate> {
        let span = item.span();
        let map = self.table(at, "action", item)?;
        let kind = self.kind(at, map, &span, ACTION_KINDS)?;
        let allowed: &[&str] = match kind {
            "command" => &["command", "name", "payload"],
            "set_var" => &["set_var", "value"],
            other => &[other],
        };
        self.keys(at, map, allowed);
        let value = map.get(kind)?;
        match kind {
            "command" => {
                let device = self.device(at, "command", value);
                let name = self
                    .required(at, map, &span, "name")
                    .and_then(|it| self.topic_name(at, "name", it, false));
                let payload = match map.get("payload") {
                    Some(it) => self.payload(at, it, trigger),
                    None => Some(Payload::Literal(Value::Object(Map::new()))),
                };
                Some(ActionTemplate::Command {
                    device: device?,
                    name: name?,
                    payload: payload?,
                })
            }
            "delay" => {
                let d = self.duration(at, "delay", value)?;
                if d > MAX_DELAY {
                    self.err(
                        at,
                        value.span(),
                        "delay: at most 24h (for a later time, use a schedule trigger)",
                    );
                    return None;
                }
                Some(ActionTemplate::Delay(d))
            }
            "set_var" => {
                let name = self.var_name(at, "set_var", value);
                let v = self
                    .required(at, map, &span, "value")
                    .and_then(|it| self.payload(at, it, trigger));
                let name = name?;
                self.vars_set.insert(name.clone());
                Some(ActionTemplate::SetVar { name, value: v? })
            }
            "clear_var" => {
                let name = self.var_name(at, "clear_var", value)?;
                self.vars_used
                    .push((name.clone(), value.span(), at.clone()));
                Some(ActionTemplate::ClearVar { name })
            }
            "log" => {
                let s = self.string(at, "log", value)?;
                if s.chars().count() > MAX_LOG_CHARS {
                    let msg = format!("log is longer than {MAX_LOG_CHARS} characters");
                    self.err(at, value.span(), msg);
                    return None;
                }
                let text = match Text::parse(s) {
                    Ok(t) => t,
                    Err(e) => {
                        self.err(at, value.span(), e);
                        return None;
                    }
                };
                let refs: Vec<Ref> = text.refs().cloned().collect();
                self.check_refs(at, value.span(), refs.iter(), trigger)
                    .then_some(ActionTemplate::Log(text))
            }
            _ => None,
        }
    }

    fn payload(&mut self, at: &At, item: &Item<'_>, trigger: Option<&Trigger>) -> Option<Payload> {
        let json = self.json(at, item)?;
        match Payload::parse(json) {
            Ok(p) => {
                let refs: Vec<Ref> = p.refs().into_iter().cloned().collect();
                self.check_refs(at, item.span(), refs.iter(), trigger)
                    .then_some(p)
            }
            Err(e) => {
                self.err(at, item.span(), e);
                None
            }
        }
    }

    /// Checks that the trigger provides what templates refer to, and notes
    /// the variables they read. `trigger` is `None` when it was invalid
    /// (already reported), and then only the variables are noted.
    fn check_refs<'r>(
        &mut self,
        at: &At,
        span: Span,
        refs: impl Iterator<Item = &'r Ref>,
        trigger: Option<&Trigger>,
    ) -> bool {
        let mut ok = true;
        for r in refs {
            match r {
                Ref::TriggerValue if trigger.is_some_and(|t| !t.has_value()) => {
                    self.err(
                        at,
                        span.clone(),
                        "{{trigger.value}}: only state and event triggers have a value",
                    );
                    ok = false;
                }
                Ref::TriggerDevice if trigger.is_some_and(|t| t.device().is_none()) => {
                    self.err(
                        at,
                        span.clone(),
                        "{{trigger.device}}: only state, event, online and offline triggers have a device",
                    );
                    ok = false;
                }
                Ref::Var(name) => self
                    .vars_used
                    .push((name.clone(), span.clone(), at.clone())),
                Ref::TriggerValue | Ref::TriggerDevice => {}
            }
        }
        ok
    }
}

/// One MQTT topic level as the rule language allows it: no wildcards, no
/// separators, nothing an ACL or a shell would trip on.
fn valid_level(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

/// A TOML value as JSON; the error names the span of the first part that
/// has no JSON form.
fn to_json(item: &Item<'_>, depth: usize) -> Result<Value, (Span, String)> {
    let fail = |msg: &str| Err((item.span(), msg.to_owned()));
    if depth > MAX_DEPTH {
        return fail("value nests too deeply");
    }
    Ok(match item.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let n = i64::from_str_radix(i.as_str(), i.radix())
                .map(Number::from)
                .or_else(|_| u64::from_str_radix(i.as_str(), i.radix()).map(Number::from));
            match n {
                Ok(n) => Value::Number(n),
                Err(_) => return fail("integer out of range"),
            }
        }
        DeValue::Float(f) => match f.as_str().parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Value::Number(n),
            None => return fail("nan and inf have no JSON form"),
        },
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(_) => {
            return fail("a TOML date-time has no JSON form: quote it as a string");
        }
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .map(|it| to_json(it, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| Ok((k.get_ref().to_string(), to_json(v, depth + 1)?)))
                .collect::<Result<Map<_, _>, _>>()?,
        ),
    })
}
