//! `hubctl rules`: apply, list, show, enable, disable, remove, test and
//! history, with their JSON views and human renderings.

use std::io::Write;
use std::path::Path;

use hub_proto::v1;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::cli::RulesCommand;
use crate::commands::{call, connect, print, print_json, read_text_file};
use crate::output::{human_time_seconds, sanitize, table};

/// The largest rules file read; hubd accepts up to 1 MiB.
const MAX_RULES_BYTES: u64 = 1024 * 1024;

/// What `rules apply --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyView {
    pub added: Vec<String>,
    pub changed: Vec<ChangeView>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    pub name: String,
    /// `- line` (only in the old rule) and `+ line` (only in the new one).
    pub diff: Vec<String>,
}

/// A rule as `rules list --json` and `rules show --json` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    pub enabled: bool,
    pub description: Option<String>,
    pub trigger: String,
    /// The stored rule as TOML.
    pub source: String,
    /// Unix seconds.
    pub updated_at: i64,
    pub runs: u64,
    /// Runs refused by loop protection (cooldown, max_runs_per_minute).
    pub refused: u64,
    /// Unix seconds; `null` if it never ran.
    pub last_run: Option<i64>,
    pub last_outcome: Option<String>,
    /// Unix seconds of its next scheduled run, for time-based rules.
    pub next_fire: Option<i64>,
}

impl From<&v1::Rule> for RuleView {
    fn from(r: &v1::Rule) -> Self {
        let nonzero = |t: i64| (t != 0).then_some(t);
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        RuleView {
            name: r.name.clone(),
            enabled: r.enabled,
            description: nonempty(&r.description),
            trigger: r.trigger.clone(),
            source: r.source.clone(),
            updated_at: r.updated_at,
            runs: r.runs,
            refused: r.refused,
            last_run: nonzero(r.last_run),
            last_outcome: nonempty(&r.last_outcome),
            next_fire: nonzero(r.next_fire),
        }
    }
}

/// One step of `rules test --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestStepView {
    pub event: String,
    pub rules: Vec<TestOutcomeView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestOutcomeView {
    pub rule: String,
    /// `fires`, `condition_fails` or `disabled`.
    pub outcome: String,
    /// For `condition_fails`: which condition (1-based).
    pub condition: Option<u32>,
    pub actions: Vec<String>,
}

/// One run in `rules history --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub rule: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub trigger: String,
    pub outcome: String,
    pub actions: Vec<String>,
    pub repeats: u64,
}

pub(crate) async fn execute(
    command: RulesCommand,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match command {
        RulesCommand::Apply { file, json } => {
            let what = format!("rules apply {}", file.display());
            let text = read_rules(&what, &file)?;
            let mut client = connect(socket).await?;
            let request = v1::ApplyRulesRequest {
                text,
                file: file_label(&file),
            };
            let answer = call(&what, client.apply_rules(request)).await?;
            let view = ApplyView {
                added: answer.added,
                changed: answer
                    .changed
                    .into_iter()
                    .map(|c| ChangeView {
                        name: c.name,
                        diff: c.diff,
                    })
                    .collect(),
                removed: answer.removed,
                unchanged: answer.unchanged,
            };
            if json {
                print_json(out, &view)
            } else {
                print(out, &apply_text(&view))
            }
        }
        RulesCommand::List { json } => {
            let rules = list(socket).await?;
            if json {
                print_json(out, &rules)
            } else {
                print(out, &list_text(&rules))
            }
        }
        RulesCommand::Show { name, json } => {
            let rules = list(socket).await?;
            let Some(rule) = rules.into_iter().find(|r| r.name == name) else {
                return Err(Error::Rpc {
                    what: format!("rules show {}", sanitize(&name)),
                    status: tonic::Status::not_found(format!(
                        "no rule named {name:?} (hubctl rules list shows them)"
                    )),
                });
            };
            if json {
                print_json(out, &rule)
            } else {
                print(out, &show_text(&rule))
            }
        }
        RulesCommand::Enable { names } => set_enabled(names, true, socket, out).await,
        RulesCommand::Disable { names } => set_enabled(names, false, socket, out).await,
        RulesCommand::Remove { names } => {
            let what = format!("rules remove {}", sanitize(&names.join(" ")));
            let mut client = connect(socket).await?;
            let request = v1::RemoveRulesRequest {
                names: names.clone(),
            };
            call(&what, client.remove_rules(request)).await?;
            let lines: String = names
                .iter()
                .map(|n| format!("removed {}\n", sanitize(n)))
                .collect();
            print(out, &lines)
        }
        RulesCommand::Test {
            file,
            events,
            at,
            json,
        } => {
            let what = format!("rules test {}", file.display());
            let text = read_rules(&what, &file)?;
            let mut client = connect(socket).await?;
            let request = v1::TestRulesRequest {
                text,
                file: file_label(&file),
                events,
                at: at.unwrap_or_default(),
            };
            let answer = call(&what, client.test_rules(request)).await?;
            let steps: Vec<TestStepView> = answer
                .steps
                .into_iter()
                .map(|s| TestStepView {
                    event: s.event,
                    rules: s
                        .rules
                        .into_iter()
                        .map(|r| TestOutcomeView {
                            condition: (r.outcome == "condition_fails").then_some(r.condition),
                            rule: r.rule,
                            outcome: r.outcome,
                            actions: r.actions,
                        })
                        .collect(),
                })
                .collect();
            if json {
                print_json(out, &steps)
            } else {
                print(out, &test_text(&steps))
            }
        }
        RulesCommand::History { rule, limit, json } => {
            let what = "rules history".to_owned();
            let mut client = connect(socket).await?;
            let request = v1::RuleHistoryRequest {
                rule: rule.unwrap_or_default(),
                limit,
            };
            let answer = call(&what, client.rule_history(request)).await?;
            let runs: Vec<RunView> = answer
                .runs
                .into_iter()
                .map(|r| RunView {
                    rule: r.rule,
                    at_ms: r.at_ms,
                    trigger: r.trigger,
                    outcome: r.outcome,
                    actions: r.actions,
                    repeats: r.repeats,
                })
                .collect();
            if json {
                print_json(out, &runs)
            } else {
                print(out, &history_text(&runs))
            }
        }
    }
}

fn read_rules(what: &str, file: &Path) -> Result<String, Error> {
    read_text_file(what, file, MAX_RULES_BYTES)
}

/// The file's name as messages show it: the path as given, `<stdin>` for `-`.
fn file_label(file: &Path) -> String {
    if file == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        file.display().to_string()
    }
}

async fn list(socket: &Path) -> Result<Vec<RuleView>, Error> {
    let mut client = connect(socket).await?;
    let answer = call("rules list", client.list_rules(v1::ListRulesRequest {})).await?;
    Ok(answer.rules.iter().map(RuleView::from).collect())
}

async fn set_enabled(
    names: Vec<String>,
    enabled: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let verb = if enabled { "enable" } else { "disable" };
    let what = format!("rules {verb} {}", sanitize(&names.join(" ")));
    let mut client = connect(socket).await?;
    let request = v1::SetRulesEnabledRequest {
        names: names.clone(),
        enabled,
    };
    let answer = call(&what, client.set_rules_enabled(request)).await?;
    let state = if enabled { "enabled" } else { "disabled" };
    let lines: String = names
        .iter()
        .map(|n| {
            if answer.changed.contains(n) {
                format!("{}: {state}\n", sanitize(n))
            } else {
                format!("{}: already {state}\n", sanitize(n))
            }
        })
        .collect();
    print(out, &lines)
}

/// The human `rules apply`: one line per added, changed and removed rule,
/// each change followed by its line diff.
pub fn apply_text(v: &ApplyView) -> String {
    let mut out = String::new();
    for name in &v.added {
        out.push_str(&format!("+ {}  (added)\n", sanitize(name)));
    }
    for change in &v.changed {
        out.push_str(&format!("~ {}  (changed)\n", sanitize(&change.name)));
        for line in &change.diff {
            out.push_str(&format!("    {}\n", sanitize(line)));
        }
    }
    for name in &v.removed {
        out.push_str(&format!("- {}  (removed)\n", sanitize(name)));
    }
    let changes = v.added.len() + v.changed.len() + v.removed.len();
    if changes == 0 {
        out.push_str(&format!(
            "no changes ({} rules, all as stored)\n",
            v.unchanged.len()
        ));
    } else {
        out.push_str(&format!(
            "applied: {} added, {} changed, {} removed, {} unchanged\n",
            v.added.len(),
            v.changed.len(),
            v.removed.len(),
            v.unchanged.len()
        ));
    }
    out
}

/// The human `rules list`: a table.
pub fn list_text(rules: &[RuleView]) -> String {
    if rules.is_empty() {
        return "no rules (hubctl rules apply FILE adds them)\n".to_owned();
    }
    let rows: Vec<Vec<String>> = rules
        .iter()
        .map(|r| {
            vec![
                sanitize(&r.name),
                if r.enabled { "yes" } else { "no" }.to_owned(),
                sanitize(&r.trigger),
                r.runs.to_string(),
                r.last_run
                    .map_or_else(|| "-".to_owned(), human_time_seconds),
                sanitize(r.last_outcome.as_deref().unwrap_or("-")),
            ]
        })
        .collect();
    table(
        &["NAME", "ENABLED", "TRIGGER", "RUNS", "LAST RUN", "OUTCOME"],
        &rows,
    )
}

/// The human `rules show`: details, then the stored TOML.
pub fn show_text(r: &RuleView) -> String {
    let or_dash = |s: Option<&str>| sanitize(s.unwrap_or("-"));
    let time = |t: Option<i64>| t.map_or_else(|| "-".to_owned(), human_time_seconds);
    let mut out = String::new();
    let rows = [
        ("name", sanitize(&r.name)),
        ("enabled", if r.enabled { "yes" } else { "no" }.to_owned()),
        ("description", or_dash(r.description.as_deref())),
        ("trigger", sanitize(&r.trigger)),
        ("runs", r.runs.to_string()),
        ("refused", r.refused.to_string()),
        ("last run", time(r.last_run)),
        ("last outcome", or_dash(r.last_outcome.as_deref())),
        ("next run", time(r.next_fire)),
        ("updated", human_time_seconds(r.updated_at)),
    ];
    for (key, value) in rows {
        out.push_str(&format!("{:<13}{value}\n", format!("{key}:")));
    }
    out.push('\n');
    for line in r.source.lines() {
        out.push_str(&sanitize(line));
        out.push('\n');
    }
    out
}

/// The human `rules test`: each event, then what each rule it triggers
/// would do.
pub fn test_text(steps: &[TestStepView]) -> String {
    let mut out = String::new();
    for step in steps {
        out.push_str(&format!("event {}\n", sanitize(&step.event)));
        if step.rules.is_empty() {
            out.push_str("  no rule is triggered\n");
        }
        for r in &step.rules {
            let head = match (r.outcome.as_str(), r.condition) {
                ("fires", _) => "fires".to_owned(),
                ("disabled", _) => "is disabled; enabled, it would".to_owned(),
                ("condition_fails", Some(n)) => {
                    format!("does not run: condition {n} does not hold")
                }
                (other, _) => sanitize(other),
            };
            out.push_str(&format!("  rule {:?} {head}\n", sanitize(&r.rule)));
            for action in &r.actions {
                out.push_str(&format!("    {}\n", sanitize(action)));
            }
        }
    }
    out
}

/// The human `rules history`: newest first, each run with its actions.
pub fn history_text(runs: &[RunView]) -> String {
    if runs.is_empty() {
        return "no rule has run since hubd started\n".to_owned();
    }
    let mut out = String::new();
    for r in runs {
        let secs = r.at_ms.div_euclid(1000);
        let mut line = format!(
            "{}  {}  {}  (on {})",
            human_time_seconds(secs),
            sanitize(&r.rule),
            sanitize(&r.outcome),
            sanitize(&r.trigger)
        );
        if r.repeats > 0 {
            line.push_str(&format!(", refused {} more times since", r.repeats));
        }
        out.push_str(&line);
        out.push('\n');
        for action in &r.actions {
            out.push_str(&format!("    {}\n", sanitize(action)));
        }
    }
    out
}
