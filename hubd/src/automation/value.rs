//! The JSON side of the rule language: JSON pointers (RFC 6901), the tests
//! that triggers and conditions apply to a value, and `{{...}}` templates.
//!
//! Everything here works on values that may be of any shape, because a device
//! publishes whatever it likes: a test on the wrong type is simply false.

use std::cmp::Ordering;

use serde_json::{Number, Value};

use crate::model::DeviceId;

use super::Context;

/// A JSON pointer (RFC 6901) into a state or event payload: `""` is the whole
/// document, `/temperature` a member, `/lights/0/on` a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer(String);

impl Pointer {
    /// The whole document.
    pub fn root() -> Self {
        Pointer(String::new())
    }

    /// Checks RFC 6901 syntax: empty, or `/`-separated reference tokens in
    /// which `~` appears only as the escapes `~0` and `~1`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if !s.is_empty() && !s.starts_with('/') {
            return Err(format!(
                "bad JSON pointer {s:?}: it must be empty or start with \"/\" (RFC 6901)"
            ));
        }
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!(
                    "bad JSON pointer {s:?}: \"~\" must be followed by 0 or 1 (RFC 6901)"
                ));
            }
        }
        Ok(Pointer(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value the pointer names, if the document has it.
    pub fn resolve<'v>(&self, doc: &'v Value) -> Option<&'v Value> {
        // serde_json implements RFC 6901 evaluation (escapes, array indices
        // without leading zeros); our parse already refused bad syntax.
        doc.pointer(&self.0)
    }
}

/// A comparison of one value against the rule's operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Test {
    /// `==`: equal JSON values; numbers compare by value, so 25 == 25.0.
    Eq(Value),
    /// `!=`: exactly "not `==`", so an absent value is unequal to anything.
    Ne(Value),
    Lt(Number),
    Le(Number),
    Gt(Number),
    Ge(Number),
    /// `between`: `low <= x <= high`, both ends included.
    Between(Number, Number),
    /// `changed`: the value differs from the previous state's (state
    /// triggers only: it needs two values).
    Changed,
}

impl Test {
    /// Whether `actual` (`None` when absent) passes. Ordering tests pass only
    /// for numbers; `Changed` compares two values and is never true here.
    pub fn holds(&self, actual: Option<&Value>) -> bool {
        let number = || actual.and_then(Value::as_number);
        let order = |operand: &Number| number().and_then(|x| number_cmp(x, operand));
        match self {
            Test::Eq(v) => actual.is_some_and(|a| json_eq(a, v)),
            Test::Ne(v) => !actual.is_some_and(|a| json_eq(a, v)),
            Test::Lt(n) => order(n) == Some(Ordering::Less),
            Test::Le(n) => matches!(order(n), Some(Ordering::Less | Ordering::Equal)),
            Test::Gt(n) => order(n) == Some(Ordering::Greater),
            Test::Ge(n) => matches!(order(n), Some(Ordering::Greater | Ordering::Equal)),
            Test::Between(lo, hi) => number().is_some_and(|x| {
                matches!(number_cmp(x, lo), Some(Ordering::Greater | Ordering::Equal))
                    && matches!(number_cmp(x, hi), Some(Ordering::Less | Ordering::Equal))
            }),
            Test::Changed => false,
        }
    }
}

/// Orders two JSON numbers exactly when both are integers (a u64 above
/// i64::MAX included) and as f64 otherwise.
pub(crate) fn number_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// JSON equality in which numbers compare by value: devices send `25.0`
/// for 25 as often as not.
pub(crate) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Whether two possibly absent values differ (absent differs from present).
pub(crate) fn differs(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => !json_eq(a, b),
        (None, None) => false,
        _ => true,
    }
}

/// What a `{{...}}` reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    /// `{{trigger.value}}`: the value the trigger's pointer selected.
    TriggerValue,
    /// `{{trigger.device}}`: the id of the device that triggered the rule.
    TriggerDevice,
    /// `{{var.NAME}}`: a hub variable (null, or empty in text, when unset).
    Var(String),
}

impl Ref {
    fn parse(inner: &str) -> Result<Self, String> {
        let inner = inner.trim();
        match inner {
            "trigger.value" => Ok(Ref::TriggerValue),
            "trigger.device" => Ok(Ref::TriggerDevice),
            _ => match inner.strip_prefix("var.") {
                Some(name) if valid_var_name(name) => Ok(Ref::Var(name.to_owned())),
                _ => Err(format!(
                    "unknown reference \"{{{{{inner}}}}}\": only trigger.value, trigger.device and var.NAME exist"
                )),
            },
        }
    }
}

/// Hub variable names: 1 to 64 of ASCII letters, digits, `_` and `-`, so a
/// name reads the same in a rule, a template and a log line.
pub(crate) fn valid_var_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One piece of a text template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Ref(Ref),
}

/// A string with `{{...}}` references, parsed once when the rule is loaded.
/// `{{` always opens a reference (there is no escape); `}}` alone is text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text(Vec<Segment>);

impl Text {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed \"{{{{\" in {s:?}"))?;
            segments.push(Segment::Ref(Ref::parse(&after[..close])?));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        Ok(Text(segments))
    }

    /// The references in order, for validation.
    pub(crate) fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.0.iter().filter_map(|s| match s {
            Segment::Ref(r) => Some(r),
            Segment::Literal(_) => None,
        })
    }

    /// The text with every reference replaced: strings as they are, other
    /// JSON values as compact JSON, and absent values as nothing.
    pub fn render(&self, b: &Bindings<'_>) -> String {
        let mut out = String::new();
        for segment in &self.0 {
            match segment {
                Segment::Literal(s) => out.push_str(s),
                Segment::Ref(r) => match b.lookup(r) {
                    Some(Value::String(s)) => out.push_str(&s),
                    Some(Value::Null) | None => {}
                    Some(v) => out.push_str(&v.to_string()),
                },
            }
        }
        out
    }

    /// The single reference when the text is exactly one `{{...}}`.
    fn only_ref(&self) -> Option<&Ref> {
        match self.0.as_slice() {
            [Segment::Ref(r)] => Some(r),
            _ => None,
        }
    }
}

/// A JSON value with templates in its strings: the payload of a command, the
/// value of `set_var`.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Nothing to substitute below this point.
    Literal(Value),
    /// A string that is exactly one reference: replaced by the raw JSON
    /// value (a number stays a number), or null when absent.
    Ref(Ref),
    /// A string with references in it: string interpolation.
    Text(Text),
    Array(Vec<Payload>),
    Object(Vec<(String, Payload)>),
}

impl Payload {
    pub(crate) fn parse(v: Value) -> Result<Self, String> {
        // Most payloads are plain JSON: keep them whole, rendered by a clone.
        if !has_template(&v) {
            return Ok(Payload::Literal(v));
        }
        Ok(match v {
            Value::String(s) if s.contains("{{") => {
                let text = Text::parse(&s)?;
                match text.only_ref() {
                    Some(r) => Payload::Ref(r.clone()),
                    None => Payload::Text(text),
                }
            }
            Value::Array(items) => Payload::Array(
                items
                    .into_iter()
                    .map(Payload::parse)
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Payload::Object(
                map.into_iter()
                    .map(|(k, v)| Ok((k, Payload::parse(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => Payload::Literal(other),
        })
    }

    /// Every reference anywhere in the payload, for validation.
    pub(crate) fn refs(&self) -> Vec<&Ref> {
        let mut out = Vec::new();
        self.collect_refs(&mut out);
        out
    }

    fn collect_refs<'a>(&'a self, out: &mut Vec<&'a Ref>) {
        match self {
            Payload::Literal(_) => {}
            Payload::Ref(r) => out.push(r),
            Payload::Text(t) => out.extend(t.refs()),
            Payload::Array(items) => items.iter().for_each(|p| p.collect_refs(out)),
            Payload::Object(members) => members.iter().for_each(|(_, p)| p.collect_refs(out)),
        }
    }

    pub fn render(&self, b: &Bindings<'_>) -> Value {
        match self {
            Payload::Literal(v) => v.clone(),
            Payload::Ref(r) => b.lookup(r).unwrap_or(Value::Null),
            Payload::Text(t) => Value::String(t.render(b)),
            Payload::Array(items) => Value::Array(items.iter().map(|p| p.render(b)).collect()),
            Payload::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(k, p)| (k.clone(), p.render(b)))
                    .collect(),
            ),
        }
    }
}

/// Whether any string in `v` opens a `{{...}}` reference.
fn has_template(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("{{"),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// What the references of one firing resolve to.
pub struct Bindings<'a> {
    pub trigger_value: Option<&'a Value>,
    pub trigger_device: Option<&'a DeviceId>,
    pub ctx: &'a dyn Context,
}

impl Bindings<'_> {
    fn lookup(&self, r: &Ref) -> Option<Value> {
        match r {
            Ref::TriggerValue => self.trigger_value.cloned(),
            Ref::TriggerDevice => self.trigger_device.map(|d| Value::from(d.as_str())),
            Ref::Var(name) => self.ctx.var(name).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pointers_follow_rfc_6901() {
        let doc = json!({"a/b": 1, "m~n": 2, "list": [10, 20], "": 3});
        for (ptr, want) in [
            ("", Some(doc.clone())),
            ("/a~1b", Some(json!(1))),
            ("/m~0n", Some(json!(2))),
            ("/list/1", Some(json!(20))),
            ("/list/01", None),
            ("/list/-", None),
            ("/", Some(json!(3))),
            ("/missing", None),
        ] {
            let p = Pointer::parse(ptr).unwrap();
            assert_eq!(p.resolve(&doc).cloned(), want, "{ptr}");
        }
        for bad in ["a", "/a~", "/a~2", "~1"] {
            assert!(Pointer::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_eq(&json!(25), &json!(25.0)));
        assert!(json_eq(&json!({"a": [1]}), &json!({"a": [1.0]})));
        assert!(!json_eq(&json!("25"), &json!(25)));
        let big = Number::from(u64::MAX);
        assert_eq!(number_cmp(&big, &Number::from(-1)), Some(Ordering::Greater));
    }

    #[test]
    fn templates_parse_and_refuse_unknown_references() {
        let t = Text::parse("at {{ trigger.value }}°, {{var.x}}").unwrap();
        assert_eq!(
            t.refs().cloned().collect::<Vec<_>>(),
            [Ref::TriggerValue, Ref::Var("x".into())]
        );
        for bad in [
            "{{trigger.val}}",
            "{{var.}}",
            "{{var.a b}}",
            "{{nope",
            "{{}}",
        ] {
            assert!(Text::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Text::parse("a }} b").unwrap().refs().count(), 0);
    }
}
