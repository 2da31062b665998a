//! The automation runner: feeds the pure engine with what devices do and
//! with the time, carries out the actions, and manages the stored rule set.
//!
//! One task owns the live state (rules, device states, variables, the run
//! limiter, the history) and takes, in turn: management requests from
//! [`AutomationHandle`], runs resuming after a `delay`, events from the bus,
//! and scheduled instants. Nothing else touches that state, so it needs no
//! lock. Commands go out through a [`Publisher`] the daemon supplies (the
//! edge's hub publish): this module never imports the edge.
//!
//! Rules are stored (table `rules`) before the runner installs them, and
//! management is serialised by one lock in the handle, so what runs is
//! always what is stored. Variables are written through in the background,
//! latest value first.
//!
//! Time: schedules are computed in the hub's time zone by the pure engine
//! (DST-safe); the runner sleeps until the next instant, at most a minute at
//! a time so that a clock set or jumping is noticed. While the clock is
//! known to be wrong (behind the build time: a board without a real-time
//! clock that has not synced yet) time-based triggers wait, the status says
//! so, and nothing fires for instants that were skipped by a jump.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::dryrun::{self, payload_value};
use super::ruleset::{self, Diff, Sourced};
use super::{
    Action, Error, Event, Rule, RuleName, RunLimiter, Snapshot, Verdict, check, next_fire,
};
use crate::bus::HubEvent;
use crate::model::DeviceId;
use crate::registry::RegistryHandle;
use crate::store::{RetainedKind, RuleRecord};

/// The longest the runner sleeps between looks at the clock.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A scheduled instant found this late (the machine was suspended, the
/// clock jumped forward) is skipped, not fired: a householder does not want
/// the 07:30 lights at 11:00.
const MISSED_GRACE: SignedDuration = SignedDuration::from_secs(120);

/// What a command publish resolves to.
pub type CommandFuture = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send>>;

/// Publishes a command (topic, JSON payload) as the hub.
pub type Publisher = Arc<dyn Fn(String, Bytes) -> CommandFuture + Send + Sync>;

/// Why a command was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Commands to isolated devices are never sent.
    #[error("not sent: {0} is isolated")]
    Isolated(String),
    #[error("not sent: {0}")]
    Failed(String),
}

/// Where the runner reads the time. Tests use a clock they move.
#[derive(Clone)]
pub struct Clock {
    now: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    trusted: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Clock {
    /// The system clock, trusted once it is past the build time.
    pub fn system() -> Clock {
        Clock::new(Timestamp::now, || crate::clock::warning().is_none())
    }

    pub fn new(
        now: impl Fn() -> Timestamp + Send + Sync + 'static,
        trusted: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Clock {
        Clock {
            now: Arc::new(now),
            trusted: Arc::new(trusted),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// What the runner is started with.
pub struct Setup {
    pub registry: RegistryHandle,
    pub events: mpsc::Receiver<HubEvent>,
    pub publish: Publisher,
    pub tz: TimeZone,
    /// Runs kept for the history.
    pub history: usize,
    pub clock: Clock,
}

/// How one run ended (or has not yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Waiting in a `delay`.
    Running,
    Completed,
    /// Some action failed (a command not sent); the others ran.
    Failed(String),
    /// Loop protection: the rule fired but was not run.
    Refused(String),
    /// The rule was changed, disabled or removed while the run waited.
    Cancelled,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Running => f.write_str("running"),
            Outcome::Completed => f.write_str("ok"),
            Outcome::Failed(why) => write!(f, "failed: {why}"),
            Outcome::Refused(why) => write!(f, "refused: {why}"),
            Outcome::Cancelled => f.write_str("cancelled: the rule changed while it waited"),
        }
    }
}

/// One entry of the run history.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub seq: u64,
    pub rule: String,
    pub at: Timestamp,
    /// The event that triggered it.
    pub trigger: String,
    pub outcome: Outcome,
    /// What each action did, in order.
    pub actions: Vec<String>,
    /// For a refusal: how many more refusals followed it without a run in
    /// between (a runaway loop is one line, not the whole history).
    pub repeats: u64,
}

/// A stored rule with what the runner knows about it.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleInfo {
    pub name: String,
    pub enabled: bool,
    pub description: Option<String>,
    pub trigger: String,
    /// The stored source, canonical TOML.
    pub source: String,
    pub updated_at: i64,
    pub runs: u64,
    pub refused: u64,
    pub last_run: Option<Timestamp>,
    pub last_outcome: Option<String>,
    pub next_fire: Option<Timestamp>,
}

/// The engine at a glance, for `hubctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub rules: u64,
    pub enabled: u64,
    pub runs: u64,
    pub refused: u64,
    /// Schedules wait because the clock is not set.
    pub waiting_for_clock: bool,
    /// The stored rules could not be loaded (the hub runs without them).
    pub problem: Option<String>,
}

enum Control {
    Install(Vec<Rule>, oneshot::Sender<()>),
    Snapshot(oneshot::Sender<(Snapshot, Timestamp)>),
    Stats(oneshot::Sender<HashMap<String, RuleStats>>),
    History {
        rule: Option<String>,
        limit: usize,
        reply: oneshot::Sender<Vec<RunRecord>>,
    },
    Status(oneshot::Sender<Status>),
}

/// What the runner counts per rule.
#[derive(Clone, Debug, Default)]
struct RuleStats {
    runs: u64,
    refused: u64,
    last_run: Option<Timestamp>,
    last_outcome: Option<String>,
    next_fire: Option<Timestamp>,
}

/// The cloneable handle the admin API uses.
#[derive(Clone)]
pub struct AutomationHandle {
    ctl: mpsc::Sender<Control>,
    registry: RegistryHandle,
    /// Serialises management, so the stored and the running set agree.
    mgmt: Arc<tokio::sync::Mutex<()>>,
    tz: TimeZone,
}

impl std::fmt::Debug for AutomationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutomationHandle").finish_non_exhaustive()
    }
}

/// Loads the stored rules, variables and device states and starts the
/// runner on `tracker` until `stop`.
pub async fn start(
    setup: Setup,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<AutomationHandle, Error> {
    let Setup {
        registry,
        events,
        publish,
        tz,
        history,
        clock,
    } = setup;
    let (records, vars, states) = blocking(&registry, |r| {
        let store = r.store();
        Ok::<_, crate::store::Error>((store.rules()?, store.automation_vars()?, store.retained()?))
    })
    .await?;
    let mut problem = None;
    let rules = match load_records(&records) {
        Ok(rules) => rules,
        Err(e) => {
            // A hub without its automations is better than no hub: devices
            // still connect, and `rules apply` can put a good set back.
            error!(error = %e, "stored rules cannot be loaded: running without automations");
            problem = Some(format!("stored rules cannot be loaded: {e}"));
            Vec::new()
        }
    };
    let ctx = Snapshot {
        vars: vars.into_iter().collect(),
        ..Snapshot::default()
    };
    // Parsed by `install` for the devices the rules look at.
    let raw_states = states
        .into_iter()
        .filter(|(_, which, _)| *which == RetainedKind::State)
        .map(|(id, _, payload)| (id, Bytes::from(payload)))
        .collect();
    let (vars_tx, vars_rx) = watch::channel(None);
    tracker.spawn(write_vars(registry.clone(), vars_rx));
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let (resume_tx, resume_rx) = mpsc::channel(256);
    let mut runner = Runner {
        rules: Vec::new(),
        by_device: HashMap::new(),
        watched: HashSet::new(),
        raw_states,
        ctx,
        online: HashSet::new(),
        limiter: RunLimiter::new(),
        history: VecDeque::new(),
        history_len: history,
        next_seq: 1,
        next_generation: 1,
        publish,
        tz: tz.clone(),
        clock,
        resume_tx,
        vars_tx,
        clock_waiting: false,
        last_look: None,
        problem,
        runs: 0,
        refused: 0,
        failures: HashMap::new(),
    };
    runner.install(rules);
    tracker.spawn(runner.run(events, ctl_rx, resume_rx, stop));
    Ok(AutomationHandle {
        ctl: ctl_tx,
        registry,
        mgmt: Arc::new(tokio::sync::Mutex::new(())),
        tz,
    })
}

fn load_records(records: &[RuleRecord]) -> Result<Vec<Rule>, Error> {
    let mut sorted: Vec<&RuleRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.position);
    let sources: Vec<&str> = sorted.iter().map(|r| r.source.as_str()).collect();
    Ok(ruleset::load(&sources)?
        .into_iter()
        .map(|s| s.rule)
        .collect())
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    registry: &RegistryHandle,
    work: impl FnOnce(&RegistryHandle) -> Result<T, E> + Send + 'static,
) -> Result<T, Error> {
    let r = registry.clone();
    match tokio::task::spawn_blocking(move || work(&r)).await {
        Ok(result) => result.map_err(|e| Error::Store(e.to_string())),
        Err(_) => Err(Error::Store("the store task panicked".to_owned())),
    }
}

/// Writes the variables whenever they change, the latest value first; at
/// the end (the runner gone) the last value is written too.
async fn write_vars(
    registry: RegistryHandle,
    mut rx: watch::Receiver<Option<Vec<(String, Value)>>>,
) {
    loop {
        let ended = rx.changed().await.is_err();
        let vars = rx.borrow_and_update().clone();
        if let Some(vars) = vars {
            let written = blocking(&registry, move |r| r.store().put_automation_vars(&vars)).await;
            if let Err(e) = written {
                warn!(error = %e, "cannot store the automation variables");
            }
        }
        if ended {
            return;
        }
    }
}

impl AutomationHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Control) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(make(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    async fn known_devices(&self) -> Result<HashSet<String>, Error> {
        let devices = blocking(&self.registry, |r| r.store().devices()).await?;
        Ok(devices.into_iter().map(|d| d.id.to_string()).collect())
    }

    /// Validates `text` as the whole new rule set and, if it is valid and
    /// differs, stores it and runs it. All or nothing: on any problem
    /// nothing changes and the error lists every problem.
    pub async fn apply(&self, text: &str, file: &str) -> Result<Diff, Error> {
        let _serial = self.mgmt.lock().await;
        let known = self.known_devices().await?;
        let parsed = ruleset::parse_file(text, file, &|id| known.contains(id))?;
        let stored = blocking(&self.registry, |r| r.store().rules()).await?;
        let old: BTreeMap<String, String> = stored
            .iter()
            .map(|r| (r.name.clone(), r.source.clone()))
            .collect();
        let new: Vec<(String, String)> = parsed
            .iter()
            .map(|s| (s.rule.name.to_string(), s.source.clone()))
            .collect();
        let diff = ruleset::diff(&old, &new);
        if diff.is_empty() && positions_match(&stored, &new) {
            return Ok(diff);
        }
        let now = Timestamp::now().as_second();
        let by_name: HashMap<&str, &RuleRecord> =
            stored.iter().map(|r| (r.name.as_str(), r)).collect();
        let records: Vec<RuleRecord> = parsed
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let name = s.rule.name.to_string();
                let before = by_name.get(name.as_str());
                RuleRecord {
                    id: before.map_or_else(new_rule_id, |r| r.id.clone()),
                    updated_at: match before {
                        Some(r) if r.source == s.source => r.updated_at,
                        _ => now,
                    },
                    position: u32::try_from(i).unwrap_or(u32::MAX),
                    name,
                    source: s.source.clone(),
                }
            })
            .collect();
        self.store_and_install(records, parsed).await?;
        info!(
            added = diff.added.len(),
            changed = diff.changed.len(),
            removed = diff.removed.len(),
            "rules applied"
        );
        Ok(diff)
    }

    async fn store_and_install(
        &self,
        records: Vec<RuleRecord>,
        rules: Vec<Sourced>,
    ) -> Result<(), Error> {
        blocking(&self.registry, move |r| r.store().replace_rules(&records)).await?;
        let rules = rules.into_iter().map(|s| s.rule).collect();
        self.ask(|tx| Control::Install(rules, tx)).await
    }

    /// Enables or disables rules by name; returns the names whose state
    /// changed. Unknown names refuse the whole request.
    pub async fn set_enabled(
        &self,
        names: &[RuleName],
        enabled: bool,
    ) -> Result<Vec<String>, Error> {
        let _serial = self.mgmt.lock().await;
        let mut stored = self.stored_sorted().await?;
        let index = find_all(&stored, names)?;
        let now = Timestamp::now().as_second();
        let mut changed = Vec::new();
        for i in index {
            let source = ruleset::with_enabled(&stored[i].source, enabled)?;
            if source != stored[i].source {
                stored[i].source = source;
                stored[i].updated_at = now;
                changed.push(stored[i].name.clone());
            }
        }
        if changed.is_empty() {
            return Ok(changed);
        }
        let rules = ruleset::load(&sources(&stored))?;
        self.store_and_install(stored, rules).await?;
        info!(rules = ?changed, enabled, "rules enabled state changed");
        Ok(changed)
    }

    /// Disables every enabled rule that names `device` (it has just been
    /// removed): such a rule would run half-broken. Returns their names.
    pub async fn disable_naming(&self, device: &DeviceId) -> Result<Vec<String>, Error> {
        let names: Vec<RuleName> = {
            let stored = self.stored_sorted().await?;
            let rules = ruleset::load(&sources(&stored))?;
            rules
                .into_iter()
                .filter(|s| s.rule.enabled && s.rule.names_device(device))
                .map(|s| s.rule.name)
                .collect()
        };
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let changed = self.set_enabled(&names, false).await?;
        warn!(%device, rules = ?changed, "device removed: the rules that named it are disabled");
        Ok(changed)
    }

    /// Removes rules by name. Refused whole if a name is unknown, or if the
    /// rules left would not be valid (one reads a variable only a removed
    /// rule sets).
    pub async fn remove(&self, names: &[RuleName]) -> Result<(), Error> {
        let _serial = self.mgmt.lock().await;
        let stored = self.stored_sorted().await?;
        let gone: HashSet<usize> = find_all(&stored, names)?.into_iter().collect();
        let kept: Vec<RuleRecord> = stored
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !gone.contains(i))
            .map(|(_, r)| r)
            .collect();
        let rules = ruleset::load(&sources(&kept)).map_err(|e| match e {
            Error::Rules(problems) => Error::Rules(
                problems
                    .into_iter()
                    .map(|mut p| {
                        p.message = format!(
                            "{} (remove or change that rule too, or apply a corrected file)",
                            p.message
                        );
                        p
                    })
                    .collect(),
            ),
            other => other,
        })?;
        self.store_and_install(kept, rules).await?;
        info!(rules = ?names.iter().map(RuleName::as_str).collect::<Vec<_>>(), "rules removed");
        Ok(())
    }

    async fn stored_sorted(&self) -> Result<Vec<RuleRecord>, Error> {
        let mut stored = blocking(&self.registry, |r| r.store().rules()).await?;
        stored.sort_by_key(|r| r.position);
        Ok(stored)
    }

    /// Every stored rule, in the order of the file that was applied, with
    /// its counters.
    pub async fn rules(&self) -> Result<Vec<RuleInfo>, Error> {
        let stored = self.stored_sorted().await?;
        let rules = ruleset::load(&sources(&stored))?;
        let stats = self.ask(Control::Stats).await?;
        Ok(stored
            .into_iter()
            .zip(rules)
            .map(|(record, sourced)| {
                let s = stats.get(&record.name).cloned().unwrap_or_default();
                RuleInfo {
                    enabled: sourced.rule.enabled,
                    description: sourced.rule.description.clone(),
                    trigger: sourced.rule.trigger.to_string(),
                    name: record.name,
                    source: record.source,
                    updated_at: record.updated_at,
                    runs: s.runs,
                    refused: s.refused,
                    last_run: s.last_run,
                    last_outcome: s.last_outcome,
                    next_fire: s.next_fire,
                }
            })
            .collect())
    }

    /// A dry run of the rules in `text` for `events` (see
    /// [`super::dryrun`]) against the hub's current states and variables,
    /// at `at` (default now; local or RFC 3339 time).
    pub async fn test(
        &self,
        text: &str,
        file: &str,
        events: &[String],
        at: Option<&str>,
    ) -> Result<Vec<dryrun::Step>, Error> {
        let known = self.known_devices().await?;
        let rules: Vec<Rule> = ruleset::parse_file(text, file, &|id| known.contains(id))?
            .into_iter()
            .map(|s| s.rule)
            .collect();
        let (ctx, now) = self.ask(Control::Snapshot).await?;
        let at = match at {
            Some(text) => dryrun::parse_time(text, &self.tz).map_err(|reason| Error::BadEvent {
                event: format!("--at {text}"),
                reason,
            })?,
            None => now,
        };
        let events = events
            .iter()
            .map(|e| dryrun::parse_event(e, &ctx, &self.tz))
            .collect::<Result<Vec<_>, _>>()?;
        let isolated = blocking(&self.registry, |r| r.isolated()).await?;
        Ok(dryrun::run(&rules, events, at, &self.tz, ctx, &isolated))
    }

    /// The most recent runs, newest first, of one rule or all.
    pub async fn history(
        &self,
        rule: Option<String>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, Error> {
        self.ask(|reply| Control::History { rule, limit, reply })
            .await
    }

    /// The hub variables, by name.
    pub async fn variables(&self) -> Result<BTreeMap<String, Value>, Error> {
        let (ctx, _) = self.ask(Control::Snapshot).await?;
        Ok(ctx.vars.into_iter().collect())
    }

    pub async fn status(&self) -> Result<Status, Error> {
        self.ask(Control::Status).await
    }
}

fn sources(records: &[RuleRecord]) -> Vec<&str> {
    records.iter().map(|r| r.source.as_str()).collect()
}

fn positions_match(stored: &[RuleRecord], new: &[(String, String)]) -> bool {
    let mut stored: Vec<&RuleRecord> = stored.iter().collect();
    stored.sort_by_key(|r| r.position);
    stored
        .iter()
        .map(|r| &r.name)
        .eq(new.iter().map(|(n, _)| n))
}

fn find_all(stored: &[RuleRecord], names: &[RuleName]) -> Result<Vec<usize>, Error> {
    names
        .iter()
        .map(|n| {
            stored
                .iter()
                .position(|r| r.name == n.as_str())
                .ok_or_else(|| Error::UnknownRule(n.to_string()))
        })
        .collect()
}

/// An opaque rule id: 64 random bits in hex.
fn new_rule_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A rule as the runner holds it.
struct Installed {
    rule: Rule,
    /// Changes whenever the rule does, so a run waiting in a delay can tell
    /// that its rule was replaced.
    generation: u64,
    next_fire: Option<Timestamp>,
    stats: RuleStats,
    /// The history entry of its last refusal, while no run followed it.
    last_refusal: Option<u64>,
}

/// The rest of a run, after a delay.
struct Resume {
    seq: u64,
    rule: RuleName,
    generation: u64,
    actions: VecDeque<Action>,
}

struct Runner {
    rules: Vec<Installed>,
    /// Rules whose trigger names a device, by device.
    by_device: HashMap<DeviceId, Vec<usize>>,
    /// Devices a trigger or a condition looks at: their states are kept
    /// parsed in `ctx`.
    watched: HashSet<DeviceId>,
    /// The last state of every other device, unparsed: the hub sees many
    /// more states than rules look at, and parsing each would cost the
    /// runner for nothing. Parsed when a rule starts to look at the device,
    /// or for a dry run.
    raw_states: HashMap<DeviceId, Bytes>,
    ctx: Snapshot,
    online: HashSet<DeviceId>,
    limiter: RunLimiter,
    history: VecDeque<RunRecord>,
    history_len: usize,
    next_seq: u64,
    next_generation: u64,
    publish: Publisher,
    tz: TimeZone,
    clock: Clock,
    resume_tx: mpsc::Sender<Resume>,
    vars_tx: watch::Sender<Option<Vec<(String, Value)>>>,
    clock_waiting: bool,
    /// When the schedules were last looked at, to notice a clock set back.
    last_look: Option<Timestamp>,
    problem: Option<String>,
    runs: u64,
    refused: u64,
    /// The first failure of runs waiting in a delay, by sequence number.
    failures: HashMap<u64, String>,
}

impl Runner {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<HubEvent>,
        mut ctl: mpsc::Receiver<Control>,
        mut resumes: mpsc::Receiver<Resume>,
        stop: CancellationToken,
    ) {
        info!(rules = self.rules.len(), "automation runner started");
        self.handle(Event::Start).await;
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(c) = ctl.recv() => self.control(c),
                Some(r) = resumes.recv() => self.resume(r).await,
                e = events.recv() => match e {
                    Some(e) => self.hub_event(e).await,
                    None => break,
                },
                _ = tokio::time::sleep(wake) => self.schedules().await,
            }
        }
        info!("automation runner stopped");
    }

    /// Replaces the rule set, keeping what is known about rules that did
    /// not change.
    fn install(&mut self, rules: Vec<Rule>) {
        let mut old: HashMap<RuleName, Installed> = self
            .rules
            .drain(..)
            .map(|i| (i.rule.name.clone(), i))
            .collect();
        let now = (self.clock.now)();
        for rule in rules {
            let installed = match old.remove(&rule.name) {
                Some(kept) if kept.rule == rule => kept,
                previous => {
                    self.limiter.forget(&rule.name);
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    Installed {
                        next_fire: None,
                        stats: previous.map(|p| p.stats).unwrap_or_default(),
                        last_refusal: None,
                        generation,
                        rule,
                    }
                }
            };
            self.rules.push(installed);
        }
        for name in old.keys() {
            self.limiter.forget(name);
        }
        self.by_device.clear();
        self.watched.clear();
        for (i, installed) in self.rules.iter().enumerate() {
            if let Some(device) = installed.rule.trigger.device() {
                self.by_device.entry(device.clone()).or_default().push(i);
                self.watched.insert(device.clone());
            }
            for condition in &installed.rule.conditions {
                if let super::Condition::State { device, .. } = condition {
                    self.watched.insert(device.clone());
                }
            }
        }
        for device in &self.watched {
            if let Some(raw) = self.raw_states.remove(device) {
                self.ctx.states.insert(device.clone(), payload_value(&raw));
            }
        }
        self.plan_schedules(now);
    }

    /// Works out each schedule's next instant after `now`.
    fn plan_schedules(&mut self, now: Timestamp) {
        for installed in &mut self.rules {
            installed.next_fire = match installed.rule.schedule() {
                Some(s) if installed.rule.enabled => next_fire(s, now, &self.tz),
                _ => None,
            };
            installed.stats.next_fire = installed.next_fire;
        }
        self.last_look = Some(now);
    }

    fn next_wake(&self) -> Duration {
        // While the clock is unset the due instants stay due; look again
        // later instead of spinning on them.
        if self.clock_waiting {
            return MAX_SLEEP;
        }
        let now = (self.clock.now)();
        self.rules
            .iter()
            .filter_map(|i| i.next_fire)
            .min()
            .map_or(MAX_SLEEP, |next| {
                Duration::try_from(next.duration_since(now))
                    .unwrap_or(Duration::ZERO)
                    .min(MAX_SLEEP)
            })
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Install(rules, reply) => {
                self.install(rules);
                self.problem = None;
                let _ = reply.send(());
            }
            Control::Snapshot(reply) => {
                let mut ctx = self.ctx.clone();
                for (device, raw) in &self.raw_states {
                    ctx.states.insert(device.clone(), payload_value(raw));
                }
                let _ = reply.send((ctx, (self.clock.now)()));
            }
            Control::Stats(reply) => {
                let stats = self
                    .rules
                    .iter()
                    .map(|i| (i.rule.name.to_string(), i.stats.clone()))
                    .collect();
                let _ = reply.send(stats);
            }
            Control::History { rule, limit, reply } => {
                let records = self
                    .history
                    .iter()
                    .rev()
                    .filter(|r| rule.as_ref().is_none_or(|name| &r.rule == name))
                    .take(limit)
                    .cloned()
                    .collect();
                let _ = reply.send(records);
            }
            Control::Status(reply) => {
                let _ = reply.send(Status {
                    rules: self.rules.len() as u64,
                    enabled: self.rules.iter().filter(|i| i.rule.enabled).count() as u64,
                    runs: self.runs,
                    refused: self.refused,
                    waiting_for_clock: self.clock_waiting,
                    problem: self.problem.clone(),
                });
            }
        }
    }

    async fn hub_event(&mut self, e: HubEvent) {
        let event = match e {
            HubEvent::State { device, payload } => {
                if !self.watched.contains(&device) {
                    self.ctx.states.remove(&device);
                    self.raw_states.insert(device, payload);
                    return;
                }
                let value = payload_value(&payload);
                let previous = self.ctx.states.insert(device.clone(), value.clone());
                Event::State {
                    device,
                    value,
                    previous,
                }
            }
            HubEvent::Event { device, .. } if !self.by_device.contains_key(&device) => return,
            HubEvent::Event {
                device,
                name,
                payload,
            } => Event::Event {
                device,
                name,
                value: payload_value(&payload),
            },
            // A takeover brings a device "online" while it already is.
            HubEvent::Online(device) => {
                if !self.online.insert(device.clone()) {
                    return;
                }
                Event::Online(device)
            }
            HubEvent::Offline(device) => {
                if !self.online.remove(&device) {
                    return;
                }
                Event::Offline(device)
            }
        };
        self.handle(event).await;
    }

    /// Evaluates the rules an event can trigger and runs those that fire.
    async fn handle(&mut self, event: Event) {
        let candidates: Vec<usize> = match &event {
            Event::State { device, .. }
            | Event::Event { device, .. }
            | Event::Online(device)
            | Event::Offline(device) => self.by_device.get(device).cloned().unwrap_or_default(),
            Event::Start | Event::Tick(_) => (0..self.rules.len()).collect(),
        };
        let now = match &event {
            Event::Tick(at) => *at,
            _ => (self.clock.now)(),
        };
        for i in candidates {
            let Some(installed) = self.rules.get(i) else {
                continue;
            };
            let Verdict::Fire(actions) = check(&installed.rule, &event, now, &self.tz, &self.ctx)
            else {
                continue;
            };
            self.start_run(i, &event, actions, now).await;
        }
    }

    async fn start_run(&mut self, i: usize, event: &Event, actions: Vec<Action>, now: Timestamp) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let installed = &mut self.rules[i];
        let name = installed.rule.name.clone();
        if let Err(refusal) = self.limiter.allow(&installed.rule, now) {
            self.refused += 1;
            installed.stats.refused += 1;
            // Repeated refusals fold into the first one's history entry.
            if let Some(entry) = installed
                .last_refusal
                .and_then(|s| self.history.iter_mut().rev().find(|r| r.seq == s))
            {
                entry.repeats += 1;
                return;
            }
            warn!(rule = %name, %refusal, "rule not run (loop protection)");
            installed.last_refusal = Some(seq);
            self.record(RunRecord {
                seq,
                rule: name.to_string(),
                at: now,
                trigger: event.to_string(),
                outcome: Outcome::Refused(refusal.to_string()),
                actions: Vec::new(),
                repeats: 0,
            });
            return;
        }
        installed.last_refusal = None;
        installed.stats.runs += 1;
        installed.stats.last_run = Some(now);
        self.runs += 1;
        let generation = installed.generation;
        self.record(RunRecord {
            seq,
            rule: name.to_string(),
            at: now,
            trigger: event.to_string(),
            outcome: Outcome::Running,
            actions: Vec::new(),
            repeats: 0,
        });
        self.carry_on(Resume {
            seq,
            rule: name,
            generation,
            actions: actions.into(),
        })
        .await;
    }

    async fn resume(&mut self, r: Resume) {
        let current = self
            .rules
            .iter()
            .any(|i| i.rule.name == r.rule && i.generation == r.generation && i.rule.enabled);
        if !current {
            self.finish(r.seq, &r.rule, Outcome::Cancelled);
            return;
        }
        self.carry_on(r).await;
    }

    /// Runs actions in order until the end or a delay.
    async fn carry_on(&mut self, mut r: Resume) {
        // The first failure of a run, also across its delays.
        let mut failure = self.failures.remove(&r.seq);
        while let Some(action) = r.actions.pop_front() {
            let mut note = action.to_string();
            match &action {
                Action::Command { payload, .. } => {
                    let topic = action.topic().unwrap_or_default();
                    let body = Bytes::from(payload.to_string());
                    if let Err(e) = (self.publish)(topic, body).await {
                        warn!(rule = %r.rule, action = %note, error = %e, "rule command failed");
                        note = format!("{note} ({e})");
                        failure.get_or_insert_with(|| e.to_string());
                    }
                }
                Action::Delay(d) => {
                    self.note(r.seq, note);
                    if let Some(why) = failure {
                        self.failures.insert(r.seq, why);
                    }
                    let tx = self.resume_tx.clone();
                    let d = *d;
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(r).await;
                    });
                    return;
                }
                Action::SetVar { name, value } => {
                    self.ctx.vars.insert(name.clone(), value.clone());
                    self.save_vars();
                }
                Action::ClearVar { name } => {
                    self.ctx.vars.remove(name);
                    self.save_vars();
                }
                Action::Log(text) => info!(target: "automation", rule = %r.rule, "{text}"),
            }
            self.note(r.seq, note);
        }
        let outcome = match failure {
            Some(why) => Outcome::Failed(why),
            None => Outcome::Completed,
        };
        self.finish(r.seq, &r.rule, outcome);
    }

    /// Fires the schedules that are due, and notices a clock that was set
    /// or jumped.
    async fn schedules(&mut self) {
        let now = (self.clock.now)();
        if !(self.clock.trusted)() {
            if !self.clock_waiting && self.rules.iter().any(|i| i.next_fire.is_some()) {
                warn!(
                    "the system clock is not set: time-based rules wait until it is \
                     (they do not fire for the time in between)"
                );
            }
            self.clock_waiting = true;
            return;
        }
        if self.clock_waiting || self.last_look.is_some_and(|last| now < last) {
            if self.clock_waiting {
                info!("the system clock is set: time-based rules run again");
            }
            // Set, or set back: plan from the clock as it is now.
            self.clock_waiting = false;
            self.plan_schedules(now);
            return;
        }
        self.last_look = Some(now);
        let due: Vec<(usize, Timestamp)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.next_fire.filter(|t| *t <= now).map(|t| (i, t)))
            .collect();
        for (i, at) in due {
            if now.duration_since(at) > MISSED_GRACE {
                warn!(rule = %self.rules[i].rule.name, %at, "scheduled time missed (the clock jumped or the hub was paused): not run");
            } else {
                let Some(installed) = self.rules.get(i) else {
                    continue;
                };
                let event = Event::Tick(at);
                if let Verdict::Fire(actions) =
                    check(&installed.rule, &event, at, &self.tz, &self.ctx)
                {
                    self.start_run(i, &event, actions, at).await;
                }
            }
            let installed = &mut self.rules[i];
            installed.next_fire = installed
                .rule
                .schedule()
                .and_then(|s| next_fire(s, now.max(at), &self.tz));
            installed.stats.next_fire = installed.next_fire;
        }
    }

    fn save_vars(&self) {
        let mut vars: Vec<(String, Value)> = self
            .ctx
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        self.vars_tx.send_replace(Some(vars));
    }

    fn record(&mut self, record: RunRecord) {
        if self.history.len() >= self.history_len {
            self.history.pop_front();
        }
        self.history.push_back(record);
    }

    fn entry(&mut self, seq: u64) -> Option<&mut RunRecord> {
        // Sequence numbers grow along the deque: search from the newest.
        self.history.iter_mut().rev().find(|r| r.seq == seq)
    }

    fn note(&mut self, seq: u64, note: String) {
        if let Some(entry) = self.entry(seq) {
            entry.actions.push(note);
        }
    }

    fn finish(&mut self, seq: u64, rule: &RuleName, outcome: Outcome) {
        self.failures.remove(&seq);
        let text = outcome.to_string();
        if let Some(entry) = self.entry(seq) {
            entry.outcome = outcome;
        }
        if let Some(installed) = self.rules.iter_mut().find(|i| i.rule.name == *rule) {
            installed.stats.last_outcome = Some(text);
        }
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
