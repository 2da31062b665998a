//! The rule set as stored and managed: each rule's canonical source, the
//! diff an apply makes, and turning stored sources back into rules.
//!
//! A rule is stored as its own source, one `[[rule]]` table in canonical
//! TOML (keys in the order written, comments and layout dropped), not as a
//! serialised [`Rule`]: the source is what `hubctl rules show` prints, what
//! an apply compares to tell a changed rule from an unchanged one, and it
//! goes back through [`parse_rules`], the one parser, when the hub starts.
//! Enabling or disabling a rule rewrites its `enabled` key.
//!
//! Pure: no I/O. The runner's handle does the storing.

use std::collections::{BTreeMap, HashMap};

use super::{Error, Problem, Rule, RuleName, RuleRef, parse_rules};

/// What the stored rule sources are called in messages about them.
pub const STORED: &str = "<stored rules>";

/// A validated rule with its canonical source.
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced {
    pub rule: Rule,
    pub source: String,
}

/// Parses and validates a rules file (see [`parse_rules`]) and gives each
/// rule its canonical source.
pub fn parse_file(
    text: &str,
    file: &str,
    known_devices: &dyn Fn(&str) -> bool,
) -> Result<Vec<Sourced>, Error> {
    let rules = parse_rules(text, file, known_devices)?;
    let doc: toml::Table = toml::from_str(text).map_err(|e| whole_file(file, &e.to_string()))?;
    let tables = match doc.get("rule") {
        Some(toml::Value::Array(items)) => items.as_slice(),
        _ => &[],
    };
    if tables.len() != rules.len() {
        return Err(whole_file(file, "rule tables and rules do not match up"));
    }
    rules
        .into_iter()
        .zip(tables)
        .map(|(rule, table)| {
            Ok(Sourced {
                source: canonical(table).map_err(|e| whole_file(file, &e))?,
                rule,
            })
        })
        .collect()
}

/// Turns stored sources back into rules, checked together as one file (a
/// variable one rule sets may be read by another). Device ids are not
/// checked against the registry: a stored rule stays loadable after a
/// device it names is removed.
pub fn load(sources: &[&str]) -> Result<Vec<Sourced>, Error> {
    let text = sources.join("\n");
    parse_file(&text, STORED, &|_| true)
}

/// The same rule's source with `enabled` set.
pub fn with_enabled(source: &str, enabled: bool) -> Result<String, Error> {
    let mut doc: toml::Table =
        toml::from_str(source).map_err(|e| whole_file(STORED, &e.to_string()))?;
    let Some(toml::Value::Table(rule)) = doc
        .get_mut("rule")
        .and_then(|r| r.as_array_mut())
        .and_then(|a| a.first_mut())
    else {
        return Err(whole_file(STORED, "a stored rule is not a [[rule]] table"));
    };
    // Written right after the name, where a reader looks for it.
    let mut rebuilt = toml::Table::new();
    for (key, value) in std::mem::take(rule) {
        if key == "enabled" {
            continue;
        }
        let is_name = key == "name";
        rebuilt.insert(key, value);
        if is_name {
            rebuilt.insert("enabled".to_owned(), toml::Value::Boolean(enabled));
        }
    }
    if !rebuilt.contains_key("enabled") {
        rebuilt.insert("enabled".to_owned(), toml::Value::Boolean(enabled));
    }
    canonical(&toml::Value::Table(rebuilt)).map_err(|e| whole_file(STORED, &e))
}

/// One `[[rule]]` table, one key per line, values inline as a rule is
/// usually written; a list of several tables (conditions, actions) gets one
/// line per item.
fn canonical(table: &toml::Value) -> Result<String, String> {
    let toml::Value::Table(rule) = table else {
        return Err("a rule is not a table".to_owned());
    };
    let mut out = String::from("[[rule]]\n");
    for (key, value) in rule {
        let key = inline_key(key);
        match value {
            toml::Value::Array(items)
                if items.len() > 1 && items.iter().all(toml::Value::is_table) =>
            {
                out.push_str(&format!("{key} = [\n"));
                for item in items {
                    out.push_str(&format!("  {},\n", inline(item)?));
                }
                out.push_str("]\n");
            }
            _ => out.push_str(&format!("{key} = {}\n", inline(value)?)),
        }
    }
    Ok(out)
}

fn inline_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

/// A value in TOML's inline syntax.
fn inline(value: &toml::Value) -> Result<String, String> {
    Ok(match value {
        toml::Value::Table(t) => {
            if t.is_empty() {
                return Ok("{}".to_owned());
            }
            let items = t
                .iter()
                .map(|(k, v)| Ok(format!("{} = {}", inline_key(k), inline(v)?)))
                .collect::<Result<Vec<_>, String>>()?;
            format!("{{ {} }}", items.join(", "))
        }
        toml::Value::Array(a) => {
            let items = a.iter().map(inline).collect::<Result<Vec<_>, String>>()?;
            format!("[{}]", items.join(", "))
        }
        // Strings, numbers, booleans and datetimes print as TOML literals.
        scalar => scalar.to_string(),
    })
}

fn whole_file(file: &str, message: &str) -> Error {
    Error::Rules(vec![Problem {
        file: file.to_owned(),
        line: 1,
        rule: None,
        message: message.to_owned(),
    }])
}

/// A refusal about one named rule, outside any file (`hubctl rules remove`).
pub fn rule_problem(name: &RuleName, message: String) -> Error {
    Error::Rules(vec![Problem {
        file: STORED.to_owned(),
        line: 1,
        rule: Some(RuleRef::Named(name.clone())),
        message,
    }])
}

/// What applying a file changes, by rule name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    /// Each with the lines only the old source has (`-`) and only the new
    /// one has (`+`), in order.
    pub changed: Vec<(String, Vec<String>)>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Compares the stored sources (by name) with the new ones, in the new
/// file's order, removed rules last.
pub fn diff(old: &BTreeMap<String, String>, new: &[(String, String)]) -> Diff {
    let mut d = Diff::default();
    for (name, source) in new {
        match old.get(name) {
            None => d.added.push(name.clone()),
            Some(before) if before == source => d.unchanged.push(name.clone()),
            Some(before) => d.changed.push((name.clone(), line_diff(before, source))),
        }
    }
    let kept: HashMap<&str, ()> = new.iter().map(|(n, _)| (n.as_str(), ())).collect();
    d.removed = old
        .keys()
        .filter(|n| !kept.contains_key(n.as_str()))
        .cloned()
        .collect();
    d
}

/// A small line diff: the longest common subsequence of lines, the rest
/// marked `-` (old only) and `+` (new only). Rules are a few dozen lines.
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
# two rules
[[rule]]
name = "fan on"
trigger = { state = "sensor-1", pointer = "/t", op = ">", value = 25 }
actions = [
  { command = "fan-1", name = "set", payload = { on = true } },
  { command = "fan-1", name = "odd", payload = { "my key" = "say \"hi\"\n", list = [1, 2.5, -3e-2], nested = { deep = [{ a = 1 }] }, empty = {} } },
]

[[rule]]
name = "morning"
enabled = false
trigger = { at = "07:30" }
[[rule.actions]]
log = "good morning"
"#;

    fn parse(text: &str) -> Vec<Sourced> {
        parse_file(text, "rules.toml", &|_| true).unwrap()
    }

    #[test]
    fn each_rule_gets_a_source_that_parses_back_to_the_same_rule() {
        let rules = parse(FILE);
        assert_eq!(rules.len(), 2);
        for r in &rules {
            assert!(r.source.starts_with("[[rule]]"), "{}", r.source);
            let again = parse(&r.source);
            assert_eq!(again.len(), 1);
            assert_eq!(again[0].rule, r.rule);
            assert_eq!(again[0].source, r.source, "canonical form is stable");
        }
        assert!(
            rules[0].source.contains(
                "trigger = { state = \"sensor-1\", pointer = \"/t\", op = \">\", value = 25 }\n"
            ),
            "{}",
            rules[0].source
        );
        // Keys keep the order they were written in.
        let name_at = rules[0].source.find("name").unwrap();
        let trigger_at = rules[0].source.find("trigger").unwrap();
        assert!(name_at < trigger_at, "{}", rules[0].source);
    }

    #[test]
    fn stored_sources_load_together() {
        let rules = parse(FILE);
        let sources: Vec<&str> = rules.iter().map(|r| r.source.as_str()).collect();
        let loaded = load(&sources).unwrap();
        assert_eq!(
            loaded.iter().map(|r| &r.rule).collect::<Vec<_>>(),
            rules.iter().map(|r| &r.rule).collect::<Vec<_>>()
        );
    }

    #[test]
    fn variables_set_by_one_stored_rule_and_read_by_another_load() {
        let file = r#"
[[rule]]
name = "set"
trigger = { start = true }
actions = [{ set_var = "mode", value = "home" }]
[[rule]]
name = "read"
trigger = { start = true }
conditions = [{ var = "mode", op = "==", value = "home" }]
actions = [{ log = "home" }]
"#;
        let rules = parse(file);
        // Alone, the reader is refused: nothing sets its variable.
        let alone = load(&[rules[1].source.as_str()]).unwrap_err().to_string();
        assert!(alone.contains("never set"), "{alone}");
        let both: Vec<&str> = rules.iter().map(|r| r.source.as_str()).collect();
        assert_eq!(load(&both).unwrap().len(), 2);
    }

    #[test]
    fn enabling_rewrites_only_the_flag() {
        let rules = parse(FILE);
        let disabled = with_enabled(&rules[0].source, false).unwrap();
        let rule = &parse(&disabled)[0].rule;
        assert!(!rule.enabled);
        assert_eq!(rule.trigger, rules[0].rule.trigger);
        assert!(disabled.contains("enabled = false"), "{disabled}");
        let enabled = with_enabled(&rules[1].source, true).unwrap();
        assert!(parse(&enabled)[0].rule.enabled);
        assert_eq!(enabled.matches("enabled").count(), 1, "{enabled}");
    }

    #[test]
    fn diff_names_added_changed_removed_and_unchanged() {
        let old: BTreeMap<String, String> = [
            ("a".to_owned(), "x = 1\ny = 2\n".to_owned()),
            ("b".to_owned(), "same\n".to_owned()),
            ("c".to_owned(), "gone\n".to_owned()),
        ]
        .into();
        let new = vec![
            ("b".to_owned(), "same\n".to_owned()),
            ("a".to_owned(), "x = 1\ny = 3\n".to_owned()),
            ("d".to_owned(), "new\n".to_owned()),
        ];
        let d = diff(&old, &new);
        assert_eq!(d.added, ["d"]);
        assert_eq!(d.removed, ["c"]);
        assert_eq!(d.unchanged, ["b"]);
        assert_eq!(
            d.changed,
            [(
                "a".to_owned(),
                vec!["- y = 2".to_owned(), "+ y = 3".to_owned()]
            )]
        );
        assert!(!d.is_empty());
        assert!(diff(&old, &[]).removed.len() == 3);
    }
}
