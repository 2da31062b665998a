//! Table-driven tests of the rule language and the engine: every trigger,
//! test, condition and template, every kind of validation problem with its
//! line and rule, loop protection, and garbage thrown at the parser.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde_json::{Value, json};

use super::*;

const KNOWN: &[&str] = &["sensor-1", "fan-1", "button-1", "lamp-1", "door-1"];

fn known(id: &str) -> bool {
    KNOWN.contains(&id)
}

fn parse(text: &str) -> Result<Vec<Rule>, Error> {
    parse_rules(text, "rules.toml", &known)
}

fn parse_ok(text: &str) -> Vec<Rule> {
    parse(text).unwrap_or_else(|e| panic!("refused:\n{e}\n---\n{text}"))
}

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn london() -> TimeZone {
    TimeZone::get("Europe/London").unwrap()
}

/// A Wednesday, 13:00 in London (BST).
const NOON: &str = "2025-06-04T12:00:00Z";

/// A one-rule file whose lines are fixed, so messages can be checked by
/// line: 1 `[[rule]]`, 2 name, 3 `extra`, 4 trigger, 5 conditions, 6 actions.
fn file(extra: &str, trigger: &str, conditions: &str, actions: &str) -> String {
    format!(
        "[[rule]]\nname = \"r\"\n{extra}\ntrigger = {trigger}\nconditions = [{conditions}]\nactions = [{actions}]\n"
    )
}

fn rule(trigger: &str, conditions: &str) -> Rule {
    let mut rules = parse_ok(&file("", trigger, conditions, r#"{ log = "fired" }"#));
    rules.remove(0)
}

fn state(device: &str, value: Value, previous: Option<Value>) -> Event {
    Event::State {
        device: id(device),
        value,
        previous,
    }
}

fn event(device: &str, name: &str, value: Value) -> Event {
    Event::Event {
        device: id(device),
        name: name.to_owned(),
        value,
    }
}

fn fires(rule: &Rule, event: &Event, now: &str, ctx: &Snapshot) -> bool {
    !evaluate(rule, event, ts(now), &london(), ctx).is_empty()
}

#[test]
fn triggers_and_tests() {
    let temp = |v: Value| json!({ "temperature": v });
    let hot = r#"{ state = "sensor-1", pointer = "/temperature", op = ">", value = 25 }"#;
    let door = |v: &str| json!({ "contact": v });
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Event, bool)> = vec![
        // state, `>`: fires on the edge into "true", never on a type mismatch.
        ("crosses up", hot, state("sensor-1", temp(json!(26)), Some(temp(json!(24)))), true),
        ("stays above", hot, state("sensor-1", temp(json!(27)), Some(temp(json!(26)))), false),
        ("first state above", hot, state("sensor-1", temp(json!(26)), None), true),
        ("stays below", hot, state("sensor-1", temp(json!(24)), Some(temp(json!(20)))), false),
        ("exactly 25", hot, state("sensor-1", temp(json!(25.0)), Some(temp(json!(20)))), false),
        ("string vs > 25", hot, state("sensor-1", temp(json!("hot")), Some(temp(json!(20)))), false),
        ("numeric string", hot, state("sensor-1", temp(json!("30")), Some(temp(json!(20)))), false),
        ("array vs > 25", hot, state("sensor-1", temp(json!([30])), None), false),
        ("pointer missing", hot, state("sensor-1", json!({ "humidity": 80 }), None), false),
        ("state not an object", hot, state("sensor-1", json!(30), None), false),
        ("previous was junk", hot, state("sensor-1", temp(json!(30)), Some(json!("x"))), true),
        ("other device", hot, state("fan-1", temp(json!(26)), Some(temp(json!(24)))), false),
        ("event, not state", hot, event("sensor-1", "x", temp(json!(26))), false),
        // the other comparisons
        ("== string", r#"{ state = "door-1", pointer = "/contact", op = "==", value = "open" }"#, state("door-1", door("open"), Some(door("closed"))), true),
        ("== already", r#"{ state = "door-1", pointer = "/contact", op = "==", value = "open" }"#, state("door-1", door("open"), Some(door("open"))), false),
        ("== 25 vs 25.0", r#"{ state = "sensor-1", pointer = "/temperature", op = "==", value = 25 }"#, state("sensor-1", temp(json!(25.0)), None), true),
        ("== bool", r#"{ state = "fan-1", pointer = "/on", op = "==", value = true }"#, state("fan-1", json!({ "on": true }), Some(json!({ "on": false }))), true),
        ("== bool vs string", r#"{ state = "fan-1", pointer = "/on", op = "==", value = true }"#, state("fan-1", json!({ "on": "true" }), None), false),
        ("== table", r#"{ state = "lamp-1", pointer = "/color", op = "==", value = { r = 1, g = 2 } }"#, state("lamp-1", json!({ "color": { "g": 2.0, "r": 1 } }), None), true),
        ("!= string", r#"{ state = "door-1", pointer = "/contact", op = "!=", value = "open" }"#, state("door-1", door("closed"), Some(door("open"))), true),
        ("!= missing", r#"{ state = "door-1", pointer = "/contact", op = "!=", value = "open" }"#, state("door-1", json!({}), Some(door("open"))), true),
        ("< crosses", r#"{ state = "sensor-1", pointer = "/temperature", op = "<", value = 10 }"#, state("sensor-1", temp(json!(9.5)), Some(temp(json!(10)))), true),
        ("<= at bound", r#"{ state = "sensor-1", pointer = "/temperature", op = "<=", value = 10 }"#, state("sensor-1", temp(json!(10)), Some(temp(json!(11)))), true),
        ("<= above", r#"{ state = "sensor-1", pointer = "/temperature", op = "<=", value = 10 }"#, state("sensor-1", temp(json!(10.1)), None), false),
        (">= at bound", r#"{ state = "sensor-1", pointer = "/temperature", op = ">=", value = 10 }"#, state("sensor-1", temp(json!(10)), Some(temp(json!(9)))), true),
        ("< null", r#"{ state = "sensor-1", pointer = "/temperature", op = "<", value = 10 }"#, state("sensor-1", temp(json!(null)), None), false),
        ("> negative int", r#"{ state = "sensor-1", pointer = "/temperature", op = ">", value = -2 }"#, state("sensor-1", temp(json!(-1)), Some(temp(json!(-3)))), true),
        ("> negative float", r#"{ state = "sensor-1", pointer = "/temperature", op = ">", value = -0.5 }"#, state("sensor-1", temp(json!(0)), Some(temp(json!(-1)))), true),
        ("between low end", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18, 22] }"#, state("sensor-1", temp(json!(18)), Some(temp(json!(17)))), true),
        ("between high end", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18, 22] }"#, state("sensor-1", temp(json!(22)), Some(temp(json!(23)))), true),
        ("between outside", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18, 22] }"#, state("sensor-1", temp(json!(22.5)), Some(temp(json!(23)))), false),
        ("between inside already", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18, 22] }"#, state("sensor-1", temp(json!(20)), Some(temp(json!(19)))), false),
        ("between string", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18, 22] }"#, state("sensor-1", temp(json!("20")), None), false),
        ("between bool", r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [18.5, 22.5] }"#, state("sensor-1", temp(json!(true)), None), false),
        ("changed", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", temp(json!(1)), Some(temp(json!(2)))), true),
        ("changed not", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", temp(json!(1)), Some(temp(json!(1.0)))), false),
        ("changed without previous", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", temp(json!(1)), None), false),
        ("changed: appeared", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", temp(json!(1)), Some(json!({}))), true),
        ("changed: disappeared", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", json!({}), Some(temp(json!(1)))), true),
        ("changed: type", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", temp(json!("1")), Some(temp(json!(1)))), true),
        ("changed: other member", r#"{ state = "sensor-1", pointer = "/temperature", op = "changed" }"#, state("sensor-1", json!({ "temperature": 1, "h": 2 }), Some(json!({ "temperature": 1, "h": 3 }))), false),
        ("changed: whole state", r#"{ state = "sensor-1", op = "changed" }"#, state("sensor-1", json!({ "temperature": 1, "h": 2 }), Some(json!({ "temperature": 1, "h": 3 }))), true),
        ("escaped pointer", r#"{ state = "sensor-1", pointer = "/a~1b/0", op = "==", value = 1 }"#, state("sensor-1", json!({ "a/b": [1] }), None), true),
        // events: every matching event, with or without a test
        ("event by name", r#"{ event = "button-1", name = "press" }"#, event("button-1", "press", json!({})), true),
        ("event other name", r#"{ event = "button-1", name = "press" }"#, event("button-1", "hold", json!({})), false),
        ("event other device", r#"{ event = "button-1", name = "press" }"#, event("lamp-1", "press", json!({})), false),
        ("event any name", r#"{ event = "button-1" }"#, event("button-1", "anything/deep", json!(null)), true),
        ("event levels", r#"{ event = "button-1", name = "key/1" }"#, event("button-1", "key/1", json!(1)), true),
        ("event test holds", r#"{ event = "button-1", name = "press", pointer = "/count", op = ">=", value = 2 }"#, event("button-1", "press", json!({ "count": 2 })), true),
        ("event test fails", r#"{ event = "button-1", name = "press", pointer = "/count", op = ">=", value = 2 }"#, event("button-1", "press", json!({ "count": 1 })), false),
        ("event test mismatch", r#"{ event = "button-1", name = "press", pointer = "/count", op = ">=", value = 2 }"#, event("button-1", "press", json!({ "count": "2" })), false),
        ("event repeats fire", r#"{ event = "button-1", op = "==", value = "x" }"#, event("button-1", "press", json!("x")), true),
        ("event vs state", r#"{ event = "button-1" }"#, state("button-1", json!({}), None), false),
        // presence and start
        ("online", r#"{ online = "fan-1" }"#, Event::Online(id("fan-1")), true),
        ("online other", r#"{ online = "fan-1" }"#, Event::Online(id("lamp-1")), false),
        ("online vs offline", r#"{ online = "fan-1" }"#, Event::Offline(id("fan-1")), false),
        ("offline", r#"{ offline = "fan-1" }"#, Event::Offline(id("fan-1")), true),
        ("start", "{ start = true }", Event::Start, true),
        ("start vs tick", "{ start = true }", Event::Tick(ts(NOON)), false),
        // schedules: a tick fires the rules whose schedule has that instant
        ("at", r#"{ at = "07:30" }"#, Event::Tick(ts("2025-06-04T06:30:00Z")), true),
        ("at, a minute late", r#"{ at = "07:30" }"#, Event::Tick(ts("2025-06-04T06:31:00Z")), false),
        ("at, UTC instead of local", r#"{ at = "07:30" }"#, Event::Tick(ts("2025-06-04T07:30:00Z")), false),
        ("at, weekend on a Wednesday", r#"{ at = "07:30", days = ["sat", "sun"] }"#, Event::Tick(ts("2025-06-04T06:30:00Z")), false),
        ("at, weekend on a Saturday", r#"{ at = "07:30", days = ["sat", "sun"] }"#, Event::Tick(ts("2025-06-07T06:30:00Z")), true),
        ("at, days as a range", r#"{ at = "07:30", days = "fri-mon" }"#, Event::Tick(ts("2025-06-09T06:30:00Z")), true),
        ("at in the spring gap", r#"{ at = "01:30" }"#, Event::Tick(ts("2025-03-30T01:00:00Z")), true),
        ("at in the fall fold, first", r#"{ at = "01:30" }"#, Event::Tick(ts("2025-10-26T00:30:00Z")), true),
        ("at in the fall fold, second", r#"{ at = "01:30" }"#, Event::Tick(ts("2025-10-26T01:30:00Z")), false),
        ("every", r#"{ every = "10m" }"#, Event::Tick(ts("2025-06-04T12:10:00Z")), true),
        ("every, off the grid", r#"{ every = "10m" }"#, Event::Tick(ts("2025-06-04T12:05:00Z")), false),
        ("cron", r#"{ cron = "0 30 7 * * mon-fri" }"#, Event::Tick(ts("2025-06-04T06:30:00Z")), true),
        ("cron weekend", r#"{ cron = "30 7 * * mon-fri" }"#, Event::Tick(ts("2025-06-07T06:30:00Z")), false),
        ("schedule vs state", r#"{ every = "10m" }"#, state("sensor-1", json!({}), None), false),
    ];
    let ctx = Snapshot::default();
    for (what, trigger, ev, want) in cases {
        let r = rule(trigger, "");
        assert_eq!(
            fires(&r, &ev, NOON, &ctx),
            want,
            "{what}: {trigger} on {ev:?}"
        );
    }
}

#[test]
fn conditions() {
    let mut ctx = Snapshot::default();
    ctx.states
        .insert(id("fan-1"), json!({ "on": false, "level": 3 }));
    ctx.vars.insert("mode".into(), json!("home"));
    ctx.vars.insert("count".into(), json!(6));
    // Variables must be set by some rule in the file; this one does it.
    let setter = r#"
[[rule]]
name = "setter"
trigger = { start = true }
actions = [{ set_var = "mode", value = 1 }, { set_var = "count", value = 1 }, { set_var = "unset", value = 1 }]
"#;
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, &str, bool)> = vec![
        // time windows, in London time
        ("day window inside", r#"{ time = { after = "07:00", before = "22:00" } }"#, NOON, true),
        ("day window start", r#"{ time = { after = "07:00", before = "22:00" } }"#, "2025-06-04T06:00:00Z", true),
        ("day window end excluded", r#"{ time = { after = "07:00", before = "22:00" } }"#, "2025-06-04T21:00:00Z", false),
        ("night window late", r#"{ time = { after = "22:00", before = "06:00" } }"#, "2025-06-04T22:30:00Z", true),
        ("night window early", r#"{ time = { after = "22:00", before = "06:00" } }"#, "2025-06-04T02:00:00Z", true),
        ("night window noon", r#"{ time = { after = "22:00", before = "06:00" } }"#, NOON, false),
        ("night window in winter", r#"{ time = { after = "22:00", before = "06:00" } }"#, "2025-01-08T05:30:00Z", true),
        ("after only", r#"{ time = { after = "12:30" } }"#, NOON, true),
        ("before only", r#"{ time = { before = "12:30" } }"#, NOON, false),
        ("seconds", r#"{ time = { after = "13:00:01" } }"#, NOON, false),
        // weekdays, in London: a Saturday 23:30 UTC is already Sunday
        ("weekday no", r#"{ weekday = ["sat", "sun"] }"#, NOON, false),
        ("weekday saturday", r#"{ weekday = ["sat", "sun"] }"#, "2025-06-07T10:00:00Z", true),
        ("weekday local sunday", r#"{ weekday = ["sun"] }"#, "2025-06-07T23:30:00Z", true),
        ("weekday local monday", r#"{ weekday = ["sat", "sun"] }"#, "2025-06-08T23:30:00Z", false),
        ("weekday range", r#"{ weekday = "mon-fri" }"#, NOON, true),
        // variables
        ("var ==", r#"{ var = "mode", op = "==", value = "home" }"#, NOON, true),
        ("var == other", r#"{ var = "mode", op = "==", value = "away" }"#, NOON, false),
        ("var != other", r#"{ var = "mode", op = "!=", value = "away" }"#, NOON, true),
        ("var unset ==", r#"{ var = "unset", op = "==", value = true }"#, NOON, false),
        ("var unset !=", r#"{ var = "unset", op = "!=", value = true }"#, NOON, true),
        ("var >", r#"{ var = "count", op = ">", value = 5 }"#, NOON, true),
        ("var > string", r#"{ var = "mode", op = ">", value = 5 }"#, NOON, false),
        ("var between", r#"{ var = "count", op = "between", value = [6, 6] }"#, NOON, true),
        // another device's state
        ("state ==", r#"{ state = "fan-1", pointer = "/on", op = "==", value = false }"#, NOON, true),
        ("state == no", r#"{ state = "fan-1", pointer = "/on", op = "==", value = true }"#, NOON, false),
        ("state <", r#"{ state = "fan-1", pointer = "/level", op = "<", value = 5 }"#, NOON, true),
        ("state missing member", r#"{ state = "fan-1", pointer = "/speed", op = "<", value = 5 }"#, NOON, false),
        ("state of silent device", r#"{ state = "lamp-1", pointer = "/on", op = "==", value = true }"#, NOON, false),
        ("state of silent device !=", r#"{ state = "lamp-1", pointer = "/on", op = "!=", value = true }"#, NOON, true),
        // all must hold
        ("all hold", r#"{ weekday = "wed" }, { var = "mode", op = "==", value = "home" }"#, NOON, true),
        ("one fails", r#"{ weekday = "wed" }, { var = "mode", op = "==", value = "away" }"#, NOON, false),
    ];
    for (what, conditions, now, want) in cases {
        let text = format!(
            "{}{setter}",
            file("", "{ start = true }", conditions, r#"{ log = "x" }"#)
        );
        let rules = parse_ok(&text);
        assert_eq!(fires(&rules[0], &Event::Start, now, &ctx), want, "{what}");
    }
}

#[test]
fn check_says_why_a_rule_does_not_run() {
    let ctx = Snapshot::default();
    let now = ts(NOON);
    let mut r = rule(
        "{ start = true }",
        r#"{ weekday = "wed" }, { time = { after = "20:00" } }"#,
    );
    let tz = london();
    assert_eq!(
        check(&r, &Event::Start, now, &tz, &ctx),
        Verdict::ConditionFailed { index: 1 }
    );
    assert_eq!(
        check(&r, &Event::Online(id("fan-1")), now, &tz, &ctx),
        Verdict::NotTriggered
    );
    r.conditions.pop();
    assert_eq!(
        check(&r, &Event::Start, now, &tz, &ctx),
        Verdict::Fire(vec![Action::Log("fired".into())])
    );
    r.enabled = false;
    assert_eq!(check(&r, &Event::Start, now, &tz, &ctx), Verdict::Disabled);
    assert!(evaluate(&r, &Event::Start, now, &tz, &ctx).is_empty());
}

#[test]
fn templates() {
    let mut ctx = Snapshot::default();
    ctx.vars.insert("mode".into(), json!("home"));
    ctx.vars.insert("obj".into(), json!({ "a": 1 }));
    let text = r#"
[[rule]]
name = "t"
trigger = { state = "sensor-1", pointer = "/temperature", op = "changed" }
cooldown = "1s"
actions = [
  { command = "fan-1", name = "set", payload = { on = true, level = "{{trigger.value}}", text = "{{ trigger.value }}°C", who = "{{trigger.device}}", list = ["{{trigger.device}}", 1, "{{var.mode}}"], unset = "{{var.nope}}", unset_text = "[{{var.nope}}]", obj = "{{var.obj}}: {{var.obj}}", braces = "a }} b" } },
  { command = "fan-1", name = "raw", payload = "{{trigger.value}}" },
  { command = "fan-1", name = "empty" },
  { set_var = "last", value = "{{trigger.value}}" },
  { set_var = "label", value = "t={{trigger.value}} m={{var.mode}}" },
  { clear_var = "last" },
  { delay = "1h30m" },
  { log = "{{trigger.device}} now {{trigger.value}}, mode {{var.mode}}{{var.nope}}" },
]

[[rule]]
name = "sets"
trigger = { start = true }
actions = [{ set_var = "mode", value = "home" }, { set_var = "obj", value = { a = 1 } }, { set_var = "nope", value = 0 }]
"#;
    let rules = parse_ok(text);
    let ev = state(
        "sensor-1",
        json!({ "temperature": 27.5 }),
        Some(json!({ "temperature": 27 })),
    );
    let actions = evaluate(&rules[0], &ev, ts(NOON), &london(), &ctx);
    let fan = || id("fan-1");
    assert_eq!(
        actions,
        vec![
            Action::Command {
                device: fan(),
                name: "set".into(),
                payload: json!({
                    "on": true,
                    "level": 27.5,
                    "text": "27.5°C",
                    "who": "sensor-1",
                    "list": ["sensor-1", 1, "home"],
                    "unset": null,
                    "unset_text": "[]",
                    "obj": "{\"a\":1}: {\"a\":1}",
                    "braces": "a }} b",
                }),
            },
            Action::Command {
                device: fan(),
                name: "raw".into(),
                payload: json!(27.5)
            },
            Action::Command {
                device: fan(),
                name: "empty".into(),
                payload: json!({})
            },
            Action::SetVar {
                name: "last".into(),
                value: json!(27.5)
            },
            Action::SetVar {
                name: "label".into(),
                value: json!("t=27.5 m=home")
            },
            Action::ClearVar {
                name: "last".into()
            },
            Action::Delay(Duration::from_secs(5400)),
            Action::Log("sensor-1 now 27.5, mode home".into()),
        ]
    );
    assert_eq!(actions[0].topic().as_deref(), Some("d/fan-1/cmd/set"));
    assert_eq!(actions[3].topic(), None);

    // A string trigger value is spliced without quotes; a value that
    // disappeared is null raw and nothing in text.
    let ev = state(
        "sensor-1",
        json!({ "temperature": "high" }),
        Some(json!({})),
    );
    let actions = evaluate(&rules[0], &ev, ts(NOON), &london(), &ctx);
    assert_eq!(
        actions[4],
        Action::SetVar {
            name: "label".into(),
            value: json!("t=high m=home")
        }
    );
    let ev = state("sensor-1", json!({}), Some(json!({ "temperature": 1 })));
    let actions = evaluate(&rules[0], &ev, ts(NOON), &london(), &ctx);
    assert_eq!(
        actions[1],
        Action::Command {
            device: fan(),
            name: "raw".into(),
            payload: Value::Null
        }
    );
    assert_eq!(actions[7], Action::Log("sensor-1 now , mode home".into()));
}

#[test]
fn events_from_publishes() {
    assert_eq!(
        Event::from_publish("d/fan-1/state", br#"{"on":true}"#, Some(json!({}))),
        Some(state("fan-1", json!({ "on": true }), Some(json!({}))))
    );
    assert_eq!(
        Event::from_publish("d/button-1/event/key/1", b"pressed", None),
        Some(event("button-1", "key/1", json!("pressed")))
    );
    for topic in [
        "d/fan-1/meta",
        "d/fan-1/event/",
        "d/Fan/state",
        "x/fan-1/state",
        "d/fan-1",
        "",
    ] {
        assert_eq!(Event::from_publish(topic, b"{}", None), None, "{topic}");
    }
}

/// Each kind of problem, with the exact line and rule the message names.
#[test]
fn validation_problems() {
    let log = r#"{ log = "x" }"#;
    let start = "{ start = true }";
    let hot = r#"{ state = "sensor-1", pointer = "/temperature", op = ">", value = 25 }"#;
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown device", file("", r#"{ state = "abc", op = "changed" }"#, "", log), r#"rules.toml:4: rule "r": trigger: unknown device "abc""#),
        ("malformed device", file("", r#"{ online = "Fan 1" }"#, "", log), r#"rules.toml:4: rule "r": trigger: device id "Fan 1" may contain only"#),
        ("unknown device in a condition", file("", start, r#"{ state = "nope", op = "==", value = 1 }"#, log), r#"rules.toml:5: rule "r": condition 1: unknown device "nope""#),
        ("unknown device in an action", file("", start, "", r#"{ command = "nope", name = "x" }"#), r#"rules.toml:6: rule "r": action 1: unknown device "nope""#),
        ("unknown key in a trigger", file("", r#"{ state = "sensor-1", pointr = "/t", op = "changed" }"#, "", log), r#"rules.toml:4: rule "r": trigger: unknown key "pointr" (expected state, pointer, op, value)"#),
        ("unknown key in a rule", file(r#"colldown = "5s""#, start, "", log), r#"rules.toml:3: rule "r": unknown key "colldown""#),
        ("unknown key in an action", file("", start, "", r#"{ log = "x", level = 1 }"#), r#"rules.toml:6: rule "r": action 1: unknown key "level""#),
        ("unknown key in a window", file("", start, r#"{ time = { after = "07:00", until = "08:00" } }"#, log), r#"rules.toml:5: rule "r": condition 1: unknown key "until""#),
        ("unknown key at the top", format!("version = 2\n{}", file("", start, "", log)), r#"rules.toml:1: unknown key "version": a rules file holds only [[rule]] tables"#),
        ("pointer without slash", file("", r#"{ state = "sensor-1", pointer = "temperature", op = "changed" }"#, "", log), r#"rules.toml:4: rule "r": trigger: bad JSON pointer "temperature": it must be empty or start with "/""#),
        ("pointer bad escape", file("", start, r#"{ state = "fan-1", pointer = "/a~2", op = "==", value = 1 }"#, log), r#"rules.toml:5: rule "r": condition 1: bad JSON pointer "/a~2""#),
        ("bad at time", file("", r#"{ at = "25:00" }"#, "", log), r#"rules.toml:4: rule "r": trigger: at: bad time "25:00""#),
        ("bad window time", file("", start, r#"{ time = { after = "7am" } }"#, log), r#"rules.toml:5: rule "r": condition 1: after: bad time "7am""#),
        ("empty window", file("", start, r#"{ time = { after = "07:00", before = "07:00" } }"#, log), r#"rules.toml:5: rule "r": condition 1: time: after and before are equal"#),
        ("bad day", file("", r#"{ at = "07:00", days = ["mon", "funday"] }"#, "", log), r#"rules.toml:4: rule "r": trigger: days: unknown day "funday""#),
        ("bad weekday condition", file("", start, r#"{ weekday = [] }"#, log), r#"rules.toml:5: rule "r": condition 1: weekday: no days given"#),
        ("bad cooldown", file(r#"cooldown = "5""#, start, "", log), r#"rules.toml:3: rule "r": cooldown: bad duration "5": a number needs a unit"#),
        ("zero cooldown", file(r#"cooldown = "0s""#, start, "", log), r#"rules.toml:3: rule "r": cooldown: bad duration "0s": must be more than zero"#),
        ("bad delay", file("", start, "", r#"{ delay = "soon" }"#), r#"rules.toml:6: rule "r": action 1: delay: bad duration "soon""#),
        ("long delay", file("", start, "", r#"{ delay = "2d" }"#), r#"rules.toml:6: rule "r": action 1: delay: at most 24h"#),
        ("every too short", file("", r#"{ every = "500ms" }"#, "", log), r#"rules.toml:4: rule "r": trigger: every: the shortest interval is 1s"#),
        ("bad cron", file("", r#"{ cron = "61 * * * *" }"#, "", log), r#"rules.toml:4: rule "r": trigger: bad cron "61 * * * *": minute 61 is outside 0-59"#),
        ("cron field count", file("", r#"{ cron = "* * *" }"#, "", log), r#"rules.toml:4: rule "r": trigger: bad cron "* * *": 3 fields"#),
        ("cron never", file("", r#"{ cron = "0 0 30 feb *" }"#, "", log), r#"rules.toml:4: rule "r": trigger: bad cron "0 0 30 feb *": it never fires"#),
        ("unknown op", file("", r#"{ state = "sensor-1", op = "=>", value = 1 }"#, "", log), r#"rules.toml:4: rule "r": trigger: unknown op "=>" (use ==, !=, <, <=, >, >=, between or changed)"#),
        ("op not a string", file("", r#"{ state = "sensor-1", op = 1, value = 1 }"#, "", log), r#"rules.toml:4: rule "r": trigger: op: expected a string, found an integer"#),
        ("missing op", file("", r#"{ state = "sensor-1" }"#, "", log), r#"rules.toml:4: rule "r": trigger: missing op"#),
        ("value without op", file("", r#"{ event = "button-1", value = 1 }"#, "", log), r#"rules.toml:4: rule "r": trigger: value without op"#),
        ("pointer without op", file("", r#"{ event = "button-1", pointer = "/x" }"#, "", log), r#"rules.toml:4: rule "r": trigger: pointer without op"#),
        ("op without value", file("", r#"{ state = "sensor-1", op = "==" }"#, "", log), r#"rules.toml:4: rule "r": trigger: op "==" needs a value"#),
        ("between scalar", file("", r#"{ state = "sensor-1", op = "between", value = 5 }"#, "", log), r#"rules.toml:4: rule "r": trigger: op "between" needs value = [low, high]"#),
        ("between backwards", file("", start, r#"{ var = "v", op = "between", value = [3, 1] }"#, log), r#"rules.toml:5: rule "r": condition 1: op "between" needs value = [low, high], two numbers with low <= high"#),
        ("between three", file("", r#"{ state = "sensor-1", op = "between", value = [1, 2, 3] }"#, "", log), r#"op "between" needs value = [low, high]"#),
        ("> on a string", file("", r#"{ state = "sensor-1", op = ">", value = "hot" }"#, "", log), r#"rules.toml:4: rule "r": trigger: op ">" compares numbers, but value is a string"#),
        ("between strings", file("", r#"{ state = "sensor-1", op = "between", value = ["a", "b"] }"#, "", log), r#"rules.toml:4: rule "r": trigger: op "between" compares numbers, but value is a string"#),
        ("changed with a value", file("", r#"{ state = "sensor-1", op = "changed", value = 1 }"#, "", log), r#"rules.toml:4: rule "r": trigger: op "changed" takes no value"#),
        ("changed in a condition", file("", start, r#"{ state = "fan-1", op = "changed" }"#, log), r#"rules.toml:5: rule "r": condition 1: op "changed" is only for state triggers"#),
        ("changed on an event", file("", r#"{ event = "button-1", op = "changed" }"#, "", log), r#"rules.toml:4: rule "r": trigger: op "changed" is only for state triggers"#),
        ("date-time value", file("", r#"{ state = "sensor-1", op = "==", value = 1979-05-27T07:32:00Z }"#, "", log), r#"rules.toml:4: rule "r": trigger: a TOML date-time has no JSON form"#),
        ("nan value", file("", r#"{ state = "sensor-1", op = "<", value = nan }"#, "", log), r#"rules.toml:4: rule "r": trigger: nan and inf have no JSON form"#),
        ("command name with a slash", file("", start, "", r#"{ command = "fan-1", name = "set/level" }"#), r#"rules.toml:6: rule "r": action 1: name "set/level" must be one topic level"#),
        ("command name wildcard", file("", start, "", r#"{ command = "fan-1", name = "+" }"#), r#"rules.toml:6: rule "r": action 1: name "+" must be one topic level"#),
        ("command without name", file("", start, "", r#"{ command = "fan-1" }"#), r#"rules.toml:6: rule "r": action 1: missing name"#),
        ("event name wildcard", file("", r#"{ event = "button-1", name = "key/#" }"#, "", log), r#"rules.toml:4: rule "r": trigger: name "key/#" must be topic levels"#),
        ("unknown reference", file("", hot, "", r#"{ log = "{{trigger.temp}}" }"#), r#"rules.toml:6: rule "r": action 1: unknown reference "{{trigger.temp}}": only trigger.value, trigger.device and var.NAME exist"#),
        ("unclosed reference", file("", hot, "", r#"{ command = "fan-1", name = "set", payload = { a = "{{trigger.value" } }"#), r#"rules.toml:6: rule "r": action 1: unclosed "{{""#),
        ("no trigger value", file("", start, "", r#"{ log = "{{trigger.value}}" }"#), r#"rules.toml:6: rule "r": action 1: {{trigger.value}}: only state and event triggers have a value"#),
        ("no trigger device", file("", r#"{ every = "1h" }"#, "", r#"{ command = "fan-1", name = "x", payload = ["{{trigger.device}}"] }"#), r#"rules.toml:6: rule "r": action 1: {{trigger.device}}: only state, event, online and offline triggers have a device"#),
        ("online has no value", file("", r#"{ online = "fan-1" }"#, "", r#"{ set_var = "v", value = "{{trigger.value}}" }"#), "only state and event triggers have a value"),
        ("variable never set", file("", start, "", r#"{ log = "{{var.mood}}" }"#), r#"rules.toml:6: rule "r": action 1: variable "mood" is never set (no rule has set_var = "mood")"#),
        ("condition variable never set", file("", start, r#"{ var = "away", op = "==", value = true }"#, log), r#"rules.toml:5: rule "r": condition 1: variable "away" is never set"#),
        ("cleared variable never set", file("", start, "", r#"{ clear_var = "away" }"#), r#"rules.toml:6: rule "r": action 1: variable "away" is never set"#),
        ("bad variable name", file("", start, "", r#"{ set_var = "a b", value = 1 }"#), r#"rules.toml:6: rule "r": action 1: variable name "a b" must be"#),
        ("missing trigger", "[[rule]]\nname = \"r\"\nactions = [{ log = \"x\" }]\n".to_owned(), r#"rules.toml:1: rule "r": missing trigger"#),
        ("missing actions", "[[rule]]\nname = \"r\"\ntrigger = { start = true }\n".to_owned(), r#"rules.toml:1: rule "r": missing actions"#),
        ("empty actions", file("", start, "", ""), r#"rules.toml:6: rule "r": actions: a rule needs at least one action"#),
        ("missing name", "\n[[rule]]\ntrigger = { start = true }\nactions = [{ log = \"x\" }]\n".to_owned(), "rules.toml:2: rule #1: missing name"),
        ("blank name", "[[rule]]\nname = \"  \"\ntrigger = { start = true }\nactions = [{ log = \"x\" }]\n" .to_owned(), r#"rules.toml:2: rule #1: rule name "  ": is empty"#),
        ("long name", format!("[[rule]]\nname = \"{}\"\ntrigger = {{ start = true }}\nactions = [{{ log = \"x\" }}]\n", "n".repeat(65)), "rules.toml:2: rule #1: rule name \"nnnn"),
        ("two trigger kinds", file("", r#"{ state = "sensor-1", every = "5m" }"#, "", log), r#"rules.toml:4: rule "r": trigger: has both "state" and "every": write one per table"#),
        ("no trigger kind", file("", "{ when = 1 }", "", log), r#"rules.toml:4: rule "r": trigger: needs one of state, event, online, offline, start, every, at, cron"#),
        ("no action kind", file("", start, "", "{ blink = 1 }"), r#"rules.toml:6: rule "r": action 1: needs one of command, delay, set_var, clear_var, log"#),
        ("start = false", file("", "{ start = false }", "", log), r#"rules.toml:4: rule "r": trigger: start = false never fires"#),
        ("enabled type", file(r#"enabled = "yes""#, start, "", log), r#"rules.toml:3: rule "r": enabled: expected true or false, found a string"#),
        ("trigger type", file("", r#""start""#, "", log), r#"rules.toml:4: rule "r": trigger: trigger: expected a table, found a string"#),
        ("runs zero", file("max_runs_per_minute = 0", start, "", log), r#"rules.toml:3: rule "r": max_runs_per_minute must be 1 to 600"#),
        ("runs huge", file("max_runs_per_minute = 99999999999999999999", start, "", log), r#"rules.toml:3: rule "r": max_runs_per_minute must be 1 to 600"#),
        ("runs float", file("max_runs_per_minute = 1.5", start, "", log), r#"rules.toml:3: rule "r": max_runs_per_minute: expected an integer, found a float"#),
        ("long description", file(&format!("description = \"{}\"", "d".repeat(257)), start, "", log), r#"rules.toml:3: rule "r": description is longer than 256 characters"#),
        ("rule not an array", "rule = 5\n".to_owned(), "rules.toml:1: rule: write each rule as a [[rule]] table"),
        ("syntax", "[[rule]]\nname = \"r\"\ntrigger = { start = \n".to_owned(), "rules.toml:3: not valid TOML: "),
        ("duplicate key", "[[rule]]\nname = \"r\"\nname = \"s\"\n".to_owned(), "rules.toml:3: not valid TOML: duplicate key"),
        ("duplicate names, the second also broken", format!("{}\n{}", file("", start, "", log), file("", "{ start = 1 }", "", log)), r#"rules.toml:9: rule "r": name: the rule at line 2 has the same name"#),
        ("duplicate names", format!("{}\n{}", file("", start, "", log), file("", start, "", log)), r#"rules.toml:9: rule "r": name: the rule at line 2 has the same name"#),
    ];
    // All mismatches at once: one wrong message should not hide the others.
    let mut wrong = Vec::new();
    for (what, text, want) in cases {
        let msg = match parse(&text) {
            Ok(_) => "accepted".to_owned(),
            Err(e) => e.to_string(),
        };
        // Every problem starts with the file and a line number.
        let located = msg.lines().all(|l| l.starts_with("rules.toml:"));
        if !msg.contains(want) || !located {
            wrong.push(format!("{what}:\n  got:  {msg}\n  want: {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_problem_is_reported_in_line_order() {
    let text = r#"
[[rule]]
name = "a"
trigger = { state = "ghost", op = "changed" }
actions = [{ delay = "forever" }]

[[rule]]
name = "b"
trigger = { at = "24:00" }
conditions = [{ weekday = ["someday"] }]
actions = [{ log = "{{trigger.value}}" }, { clear_var = "x" }]
"#;
    let Err(Error::Rules(problems)) = parse(text) else {
        panic!("accepted");
    };
    let got: Vec<(usize, String)> = problems
        .iter()
        .map(|p| {
            (
                p.line,
                p.rule.as_ref().map(ToString::to_string).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (4, r#"rule "a""#.to_owned()),
            (5, r#"rule "a""#.to_owned()),
            (9, r#"rule "b""#.to_owned()),
            (10, r#"rule "b""#.to_owned()),
            // The `{{trigger.value}}` on line 11 is not checked against a
            // trigger that is itself invalid; clear_var's unset variable is.
            (11, r#"rule "b""#.to_owned()),
        ],
        "{}",
        Error::Rules(problems.clone())
    );
}

/// The precise loop rule: a state or event trigger on D, a command to D, no
/// cooldown and no condition on D's state.
#[test]
fn self_triggering_rules() {
    let watch_fan = r#"{ state = "fan-1", pointer = "/on", op = "changed" }"#;
    let press = r#"{ event = "button-1", name = "press" }"#;
    let to_fan = r#"{ command = "fan-1", name = "toggle" }"#;
    let to_button = r#"{ command = "button-1", name = "led" }"#;
    #[rustfmt::skip]
    let cases: Vec<(&str, String, bool)> = vec![
        ("state loop", file("", watch_fan, "", to_fan), false),
        ("event loop", file("", press, "", &format!(r#"{{ log = "x" }}, {to_button}"#)), false),
        ("with a cooldown", file(r#"cooldown = "5s""#, watch_fan, "", to_fan), true),
        ("with a condition on the device", file("", watch_fan, r#"{ state = "fan-1", pointer = "/on", op = "==", value = false }"#, to_fan), true),
        ("a condition on another device is not enough", file("", watch_fan, r#"{ state = "lamp-1", op = "==", value = 1 }"#, to_fan), false),
        ("a time condition is not enough", file("", watch_fan, r#"{ time = { after = "07:00" } }"#, to_fan), false),
        ("commanding another device", file("", watch_fan, "", to_button), true),
        ("online trigger", file("", r#"{ online = "fan-1" }"#, "", to_fan), true),
        ("schedule trigger", file("", r#"{ every = "1m" }"#, "", to_fan), true),
    ];
    for (what, text, ok) in cases {
        match parse(&text) {
            Ok(_) => assert!(ok, "{what}: accepted"),
            Err(e) => {
                assert!(!ok, "{what}: refused: {e}");
                let msg = e.to_string();
                assert!(
                    msg.contains(r#"rules.toml:6: rule "r": action"#)
                        && msg.contains("would retrigger itself")
                        && msg.contains("add a cooldown or a condition on the state of"),
                    "{what}: {msg}"
                );
            }
        }
    }
}

#[test]
fn the_module_doc_example_parses() {
    let source = include_str!("../automation.rs");
    let example: String = source
        .lines()
        .skip_while(|l| *l != "//! ```toml")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| {
            format!(
                "{}\n",
                l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
            )
        })
        .collect();
    let rules = parse_ok(&example);
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["fan on when hot", "leaving", "back", "morning light"]
    );
    assert_eq!(rules[0].cooldown, Some(Duration::from_secs(30)));
    assert_eq!(rules[0].conditions.len(), 4);
    assert_eq!(rules[1].max_runs_per_minute, 10);
    assert!(rules[3].schedule().is_some());
    assert!(
        matches!(&rules[3].actions[..], [ActionTemplate::Command { name, .. }] if name == "set")
    );
}

#[test]
fn sections_and_defaults() {
    let text = r#"
[[rule]]
name = "sections"
enabled = false
max_runs_per_minute = 600

[rule.trigger]
state = "sensor-1"
op = "changed"

[[rule.conditions]]
weekday = "sat"

[[rule.actions]]
command = "fan-1"
name = "set"
payload = { level = 0x10, ratio = 0.5, tags = ["a"], big = 18446744073709551615 }
"#;
    let rules = parse_ok(text);
    let r = &rules[0];
    assert!(!r.enabled);
    assert_eq!(r.max_runs_per_minute, 600);
    assert_eq!(r.cooldown, None);
    assert_eq!(r.description, None);
    let ActionTemplate::Command { payload, .. } = &r.actions[0] else {
        panic!("{:?}", r.actions);
    };
    assert_eq!(
        *payload,
        Payload::Literal(json!({ "level": 16, "ratio": 0.5, "tags": ["a"], "big": u64::MAX }))
    );
    assert_eq!(parse("").unwrap(), vec![]);
    assert_eq!(parse("# nothing yet\n").unwrap(), vec![]);
}

#[test]
fn rule_names() {
    assert!(RuleName::parse("fan on when hot").is_ok());
    assert_eq!(
        RuleName::parse("").unwrap_err().to_string(),
        r#"rule name "": is empty"#
    );
    assert!(RuleName::parse("a\tb").is_err());
    assert!(RuleName::parse(&"é".repeat(64)).is_ok());
    assert!(RuleName::parse(&"é".repeat(65)).is_err());
}

#[test]
fn run_limiter() {
    let mut r = rule("{ start = true }", "");
    r.cooldown = Some(Duration::from_secs(30));
    r.max_runs_per_minute = 3;
    let t0 = ts(NOON);
    let at = |secs: i64| {
        t0.checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap()
    };
    let mut limiter = RunLimiter::new();
    assert_eq!(limiter.allow(&r, t0), Ok(()));
    assert_eq!(
        limiter.allow(&r, at(10)),
        Err(Refusal::Cooldown {
            remaining: Duration::from_secs(20)
        })
    );
    assert_eq!(limiter.allow(&r, at(30)), Ok(()));

    // The per-minute cap, without a cooldown.
    r.cooldown = None;
    let mut limiter = RunLimiter::new();
    for s in [0, 1, 2] {
        assert_eq!(limiter.allow(&r, at(s)), Ok(()), "run at {s}s");
    }
    let refused = limiter.allow(&r, at(3));
    assert_eq!(
        refused,
        Err(Refusal::TooManyRuns {
            limit: 3,
            retry_after: Duration::from_secs(57)
        })
    );
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("ran 3 times in the last minute")
    );
    // Refusals do not count as runs; the first run leaves the window at 60s.
    assert!(limiter.allow(&r, at(59)).is_err());
    assert_eq!(limiter.allow(&r, at(60)), Ok(()));
    assert!(limiter.allow(&r, at(60)).is_err());
    // Other rules are counted apart.
    let mut other = r.clone();
    other.name = RuleName::parse("other").unwrap();
    assert_eq!(limiter.allow(&other, at(60)), Ok(()));
    // A clock set back an hour does not hold the rule for an hour.
    assert_eq!(limiter.allow(&r, at(-3600)), Ok(()));
    // Forgetting a rule starts it afresh.
    for s in [1, 2] {
        assert_eq!(limiter.allow(&r, at(-3600 + s)), Ok(()));
    }
    assert!(limiter.allow(&r, at(-3597)).is_err());
    limiter.forget(&r.name);
    assert_eq!(limiter.allow(&r, at(-3597)), Ok(()));
    assert_eq!(
        Refusal::Cooldown {
            remaining: Duration::from_millis(1500)
        }
        .to_string(),
        "cooling down for another 1.5s"
    );
}

/// A small deterministic generator (xorshift64*), so the garbage tests are
/// the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap()).unwrap()
    }
}

const TOKENS: &[&str] = &[
    "[[rule]]",
    "[rule.trigger]",
    "[[rule.actions]]",
    "\n",
    " ",
    "=",
    ",",
    "{",
    "}",
    "[",
    "]",
    "name",
    "\"r\"",
    "\"s\"",
    "trigger",
    "conditions",
    "actions",
    "enabled",
    "cooldown",
    "max_runs_per_minute",
    "state",
    "event",
    "online",
    "offline",
    "start",
    "every",
    "at",
    "cron",
    "days",
    "pointer",
    "op",
    "value",
    "command",
    "payload",
    "delay",
    "set_var",
    "clear_var",
    "log",
    "var",
    "time",
    "after",
    "before",
    "weekday",
    "\"sensor-1\"",
    "\"fan-1\"",
    "\"ghost\"",
    "\">\"",
    "\"==\"",
    "\"between\"",
    "\"changed\"",
    "\"/temperature\"",
    "\"~\"",
    "25",
    "-1",
    "0",
    "1e400",
    "nan",
    "inf",
    "3.5",
    "true",
    "false",
    "[1, 2]",
    "[2, 1]",
    "\"{{trigger.value}}\"",
    "\"{{var.x}}\"",
    "\"{{\"",
    "\"}}\"",
    "\"07:30\"",
    "\"25:00\"",
    "\"01:30\"",
    "\"10m\"",
    "\"0s\"",
    "\"99999999999999999999d\"",
    "\"* * * * * *\"",
    "\"0 0 30 feb *\"",
    "\"*/0 * * * *\"",
    "\"mon-sun\"",
    "[\"fri-mon\"]",
    "1979-05-27T07:32:00Z",
    "#",
    "'",
    "\"\"\"",
    "\\",
    "é",
    "\u{0}",
    "\u{202e}",
    "\"\\u0000\"",
    "0x7fffffffffffffff",
    "0xffffffffffffffff",
    "18446744073709551616",
    "\"set/level\"",
    "\"+\"",
];

/// Whatever text arrives, parsing returns (and what parses evaluates and
/// schedules) without a panic.
#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let tz = london();
    let ctx = Snapshot::default();
    let events = [
        state(
            "sensor-1",
            json!({ "temperature": 30 }),
            Some(json!({ "temperature": 1 })),
        ),
        state("fan-1", json!("junk"), None),
        event("button-1", "press", json!([1, { "a": null }])),
        Event::Online(id("fan-1")),
        Event::Start,
        Event::Tick(ts("2025-03-30T01:00:00Z")),
        Event::Tick(Timestamp::MAX),
        Event::Tick(Timestamp::MIN),
    ];
    let base = file(
        r#"cooldown = "5s""#,
        r#"{ state = "sensor-1", pointer = "/temperature", op = "between", value = [1, 50] }"#,
        r#"{ time = { after = "22:00", before = "06:00" } }"#,
        r#"{ command = "fan-1", name = "set", payload = { level = "{{trigger.value}}" } }, { log = "{{trigger.device}}" }"#,
    );
    let mut accepted = 0;
    for round in 0..4000 {
        let text: String = match round % 3 {
            // Token soup.
            0 => (0..rng.below(60))
                .map(|_| TOKENS[rng.below(TOKENS.len())])
                .collect(),
            // A valid file with a piece cut out and a token put in.
            1 => {
                let chars: Vec<char> = base.chars().collect();
                let cut = rng.below(chars.len());
                let len = rng.below(12);
                let mut s: String = chars[..cut].iter().collect();
                s.push_str(TOKENS[rng.below(TOKENS.len())]);
                s.extend(chars.iter().skip(cut + len));
                s
            }
            // Raw bytes.
            _ => {
                let bytes: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        let Ok(rules) = parse_rules(&text, "fuzz.toml", &known) else {
            continue;
        };
        accepted += 1;
        for r in &rules {
            for ev in &events {
                let _ = evaluate(r, ev, ts(NOON), &tz, &ctx);
            }
            if let Some(s) = r.schedule() {
                let _ = next_fire(s, ts(NOON), &tz);
                let _ = next_fire(s, Timestamp::MAX, &tz);
            }
        }
    }
    // Some mutants of the valid file still parse, so evaluation is exercised.
    assert!(accepted > 10, "only {accepted} inputs parsed");
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let depth = 2000;
    let text = format!(
        "[[rule]]\nname = \"r\"\ntrigger = {{ start = true }}\nactions = [{{ command = \"fan-1\", name = \"x\", payload = {}{} }}]\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert!(parse(&text).is_err());
    let ok = format!(
        "[[rule]]\nname = \"r\"\ntrigger = {{ start = true }}\nactions = [{{ command = \"fan-1\", name = \"x\", payload = {}{} }}]\n",
        "[".repeat(20),
        "]".repeat(20)
    );
    assert!(parse(&ok).is_ok());
}
